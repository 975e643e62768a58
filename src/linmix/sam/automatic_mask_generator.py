"""Segment Anything's automatic mask generator for RWKV-SAM: masks for a whole image without prompts.

    generator = AutomaticMaskGenerator(build_rwkv_sam("small", checkpoint="rwkv_sam_small.safetensors"))
    records = generator.generate(image)            # HxWx3 uint8 RGB numpy

The algorithm is SAM's: a regular grid of single foreground points over the image (and, with
``crop_n_layers > 0``, over overlapping crops of it), each point decoded into 3 masks; masks kept when
their predicted IoU and their stability score (IoU of the mask thresholded at ``mask_threshold +
offset`` and at ``mask_threshold - offset``) pass thresholds; duplicates removed by box NMS within a
crop, then across crops (preferring smaller crops' masks); optionally small islands and holes
removed. Each record is a dict: ``segmentation`` (HxW bool, or an RLE dict), ``bbox`` XYWH, ``area``,
``predicted_iou``, ``point_coords`` ``[[x, y]]``, ``stability_score``, ``crop_box`` XYWH.

No OpenCV, SciPy, torchvision or pycocotools: NMS, connected components and COCO's compressed RLE
strings are implemented here.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from linmix.sam.model import RwkvSam
from linmix.sam.predictor import RwkvSamPredictor

__all__ = [
    "AutomaticMaskGenerator",
    "area_from_rle",
    "batched_mask_to_box",
    "batched_nms",
    "box_iou",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_rle_string_to_counts",
    "counts_to_coco_rle_string",
    "generate_crop_boxes",
    "label_connected_components",
    "mask_to_rle",
    "remove_small_regions",
    "rle_to_mask",
]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# -------------------------------------------------------------------------------------------------
# masks, boxes, RLE


def mask_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Binary masks ``[B, H, W]`` (or one ``[H, W]``) -> uncompressed COCO RLEs
    ``{"size": [H, W], "counts": [...]}``: run lengths in column-major (Fortran) order, starting with
    the number of leading zeros (0 when the first pixel is set)."""
    masks = torch.as_tensor(masks)
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, H, W] or [H, W], got shape {tuple(masks.shape)}")
    b, h, w = masks.shape
    flat = masks.bool().permute(0, 2, 1).reshape(b, h * w)
    out = []
    if h * w == 0:
        return [{"size": [h, w], "counts": [0]} for _ in range(b)]
    changes = (flat[:, 1:] ^ flat[:, :-1]).nonzero()
    for i in range(b):
        idx = changes[changes[:, 0] == i, 1] + 1
        bounds = torch.cat([idx.new_zeros(1), idx, idx.new_full((1,), h * w)])
        runs = (bounds[1:] - bounds[:-1]).tolist()
        counts = [0] + runs if bool(flat[i, 0]) else runs
        out.append({"size": [h, w], "counts": [int(c) for c in counts]})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """An RLE dict (uncompressed counts list, or a COCO compressed string / bytes) -> ``[H, W]`` bool."""
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_rle_string_to_counts(counts)
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected H * W = {h * w}")
    flat = np.zeros(h * w, dtype=bool)
    position, value = 0, False
    for count in counts:
        if value:
            flat[position : position + count] = True
        position += count
        value = not value
    return flat.reshape(w, h).T.copy()


def area_from_rle(rle: dict[str, Any]) -> int:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_rle_string_to_counts(counts)
    return int(sum(counts[1::2]))


def counts_to_coco_rle_string(counts: list[int]) -> str:
    """Run lengths -> COCO's compressed string (pycocotools' ``rleToString``): each count, minus the count
    two before it from the fourth on, in 5-bit groups with a continuation bit, offset by 48."""
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in C for a signed long
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def coco_rle_string_to_counts(s: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' ``rleFrString``)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Masks ``[..., H, W]`` -> boxes ``[..., 4]`` XYXY with inclusive right/bottom pixel indices (SAM's
    convention: a single pixel at (x, y) gives [x, y, x, y]); an empty mask gives [0, 0, 0, 0]."""
    masks = torch.as_tensor(masks)
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device, dtype=torch.long)
    shape = masks.shape
    h, w = shape[-2:]
    masks = masks.bool().reshape(-1, h, w)
    rows = masks.any(dim=-1)  # [N, H]
    cols = masks.any(dim=-2)  # [N, W]
    y = torch.arange(h, device=masks.device)
    x = torch.arange(w, device=masks.device)
    bottom = torch.where(rows, y, -1).amax(dim=-1)
    top = torch.where(rows, y, h).amin(dim=-1)
    right = torch.where(cols, x, -1).amax(dim=-1)
    left = torch.where(cols, x, w).amin(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(dim=-1)
    boxes = boxes * (~empty).unsqueeze(-1)
    return boxes.reshape(*shape[:-2], 4)


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """Mask logits ``[..., H, W]`` -> ``|logits > t + offset| / |logits > t - offset|`` (IoU of the two
    binary masks, the first inside the second). An empty union gives 0."""
    high = (masks > (mask_threshold + threshold_offset)).sum(dim=(-1, -2), dtype=torch.int64)
    low = (masks > (mask_threshold - threshold_offset)).sum(dim=(-1, -2), dtype=torch.int64)
    return torch.where(low > 0, high.double() / low.clamp(min=1).double(), torch.zeros_like(high, dtype=torch.double)).float()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of XYXY boxes ``[N, 4]`` x ``[M, 4]`` -> ``[N, M]`` (area = (x1 - x0) * (y1 - y0))."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS within each category of ``idxs``: indices of the boxes kept, by decreasing score.
    A box is dropped when its IoU with a kept, higher-scoring box of the same category is > threshold."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    # Shift each category's boxes apart so that boxes of different categories never overlap.
    offsets = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + offsets[:, None]
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(shifted[order], shifted[order]).cpu().numpy()
    n = order.numel()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def box_xyxy_to_xywh(box: torch.Tensor | np.ndarray) -> list:
    x0, y0, x1, y1 = (float(v) if not float(v).is_integer() else int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# -------------------------------------------------------------------------------------------------
# point grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n_per_side ** 2`` points ``[N, 2]`` (x, y) in [0, 1], centred in an n x n grid of cells."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``n_per_side / scale_per_layer ** i`` points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """Crop boxes XYXY and their layer: the whole image (layer 0), then for layer i >= 1 a
    ``2**i x 2**i`` grid of overlapping crops."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes = [[0, 0, im_w, im_h]]
    layer_idxs = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0) -> torch.Tensor:
    """Boxes (crop frame, XYXY) with a side within ``atol`` of a crop edge that is not an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)


def uncrop_points(points: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return points + torch.tensor([x0, y0], device=points.device, dtype=points.dtype)


def uncrop_masks(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


# -------------------------------------------------------------------------------------------------
# connected components (no OpenCV / SciPy)


def label_connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D bool mask.

    Returns ``labels`` (int32, 0 for background, 1..K for components, numbered in raster order of their
    first pixel) and ``sizes`` (K pixel counts; ``sizes[k - 1]`` is component k's)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(diff == 1)
    _, run_ends = np.nonzero(diff == -1)  # exclusive; same row-major order as the starts
    n_runs = len(run_rows)
    if n_runs == 0:
        return np.zeros((h, w), dtype=np.int32), np.zeros(0, dtype=np.int64)

    parent = list(range(n_runs))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(run_rows, np.arange(h + 1))
    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), run_ends.tolist()
    for r in range(1, h):
        i, i_end = row_first[r], row_first[r + 1]
        j, j_end = row_first[r - 1], row_first[r]
        while i < i_end and j < j_end:
            # 8-connectivity: runs touch when [s, e) and [s', e') overlap after widening by one pixel.
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(k) for k in range(n_runs)])
    unique_roots, run_labels = np.unique(roots, return_inverse=True)  # roots sorted = raster order
    run_labels = run_labels + 1
    lengths = run_ends - run_starts
    sizes = np.bincount(run_labels, weights=lengths, minlength=len(unique_roots) + 1)[1:].astype(np.int64)
    delta = np.zeros(h * w + 1, dtype=np.int64)
    flat_starts = run_rows * w + run_starts
    flat_ends = run_rows * w + run_ends
    np.add.at(delta, flat_starts, run_labels)
    np.add.at(delta, flat_ends, -run_labels)
    labels = np.cumsum(delta[:-1]).reshape(h, w).astype(np.int32)
    return labels, sizes


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """SAM's clean-up: ``mode="holes"`` fills background components smaller than ``area_thresh``;
    ``mode="islands"`` drops foreground components smaller than it (keeping the largest when all are).
    Returns the mask and whether it changed."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    correct_holes = mode == "holes"
    working = mask ^ correct_holes
    labels, sizes = label_connected_components(working)
    small = [i + 1 for i, s in enumerate(sizes.tolist()) if s < area_thresh]
    if not small:
        return mask, False
    if correct_holes:
        return mask | np.isin(labels, small), True
    keep = [i for i in range(1, len(sizes) + 1) if i not in set(small)]
    if not keep:
        keep = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, keep), True


# -------------------------------------------------------------------------------------------------
# the generator


class _MaskData:
    """Columns of equal length (tensors, arrays or lists) filtered and concatenated together."""

    def __init__(self, **columns: Any) -> None:
        self.columns: dict[str, Any] = dict(columns)

    def __getitem__(self, key: str) -> Any:
        return self.columns[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.columns[key] = value

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def filter(self, keep: torch.Tensor) -> None:
        keep = torch.as_tensor(keep)
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        index = keep.cpu().tolist()
        for key, value in self.columns.items():
            if isinstance(value, torch.Tensor):
                self.columns[key] = value[keep.to(value.device)]
            elif isinstance(value, np.ndarray):
                self.columns[key] = value[np.asarray(index, dtype=np.int64)]
            else:
                self.columns[key] = [value[i] for i in index]

    def cat(self, other: "_MaskData") -> None:
        if not self.columns:
            self.columns = dict(other.columns)
            return
        for key, value in other.columns.items():
            mine = self.columns[key]
            if isinstance(mine, torch.Tensor):
                self.columns[key] = torch.cat([mine, value.to(mine.device)])
            else:
                self.columns[key] = list(mine) + list(value)


class AutomaticMaskGenerator:
    """Masks for everything in an image, Segment Anything's ``SamAutomaticMaskGenerator`` for RWKV-SAM.

    Args:
        model: an :class:`RwkvSam`.
        points_per_side: points along one side of the grid of single-point prompts (``points_per_side
            ** 2`` prompts); None when ``point_grids`` are given.
        points_per_batch: prompts decoded together (memory vs. speed).
        pred_iou_thresh: keep masks whose predicted IoU is above it (0 disables the filter).
        stability_score_thresh: keep masks whose stability score is above it (0 disables the filter).
        stability_score_offset: logit offset around ``mask_threshold`` for the stability score.
        box_nms_thresh: IoU above which NMS drops the lower-scoring of two masks' boxes in a crop.
        crop_n_layers: with n > 0, also run on the crops of layers 1..n (layer i: ``2**i x 2**i`` crops).
        crop_nms_thresh: box NMS threshold between masks of different crops.
        crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the image's short side in layer 1.
        crop_n_points_downscale_factor: layer i's grid has ``points_per_side / factor**i`` points per side.
        point_grids: explicit grids ``[N, 2]`` in [0, 1] (x, y), one per layer (``crop_n_layers + 1``).
        min_mask_region_area: when > 0, fill holes and drop islands smaller than this many pixels.
        output_mode: "binary_mask" (HxW bool), "uncompressed_rle" ({"size", "counts": list}) or
            "coco_rle" ({"size", "counts": COCO compressed string}).
    """

    def __init__(
        self,
        model: RwkvSam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if int(crop_n_layers) < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_side is not None:
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            if int(crop_n_points_downscale_factor) < 1:
                raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got {crop_n_points_downscale_factor}")
            grids = build_all_layer_point_grids(int(points_per_side), int(crop_n_layers), int(crop_n_points_downscale_factor))
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) != int(crop_n_layers) + 1:
                raise ValueError(f"point_grids must have one grid per layer ({int(crop_n_layers) + 1}), got {len(grids)}")
            for g in grids:
                if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0 or g.min() < 0 or g.max() > 1:
                    raise ValueError(f"each point grid must be a non-empty Nx2 array of (x, y) in [0, 1], got shape {g.shape}")
        for grid in grids:
            if len(grid) == 0:
                raise ValueError("a crop layer has an empty point grid: lower crop_n_points_downscale_factor")
        self.predictor = RwkvSamPredictor(model)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.point_grids = grids
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image: a list of records (see the module docstring)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            what = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image must be an HxWx3 uint8 RGB numpy array, got {what}")
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0 and len(data) > 0:
            data = self._postprocess_small_regions(data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))

        records = []
        for i in range(len(data)):
            rle = data["rles"][i]
            if self.output_mode == "binary_mask":
                segmentation: Any = rle_to_mask(rle)
            elif self.output_mode == "coco_rle":
                segmentation = {"size": list(rle["size"]), "counts": counts_to_coco_rle_string(rle["counts"])}
            else:
                segmentation = {"size": list(rle["size"]), "counts": list(rle["counts"])}
            records.append(
                {
                    "segmentation": segmentation,
                    "area": area_from_rle(rle),
                    "bbox": box_xyxy_to_xywh(data["boxes"][i]),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [[float(v) for v in data["points"][i]]],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]),
                }
            )
        return records

    # -- internals ---------------------------------------------------------------------------------

    def _generate_masks(self, image: np.ndarray) -> _MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))
        if len(crop_boxes) > 1 and len(data) > 0:
            # Between crops prefer the masks of smaller crops (score 1 / crop area).
            scores = 1 / box_area(data["crop_boxes"].float())
            keep = batched_nms(data["boxes"].float(), scores, torch.zeros_like(scores), self.crop_nms_thresh)
            data.filter(keep)
        return data

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer_idx: int, orig_size: tuple[int, int]) -> _MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = np.ascontiguousarray(image[y0:y1, x0:x1])
        crop_size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]  # (x, y) in crop pixels
        data = _MaskData()
        for start in range(0, len(points), self.points_per_batch):
            data.cat(self._process_batch(points[start : start + self.points_per_batch], crop_size, crop_box, orig_size))
        self.predictor.reset_image()
        if len(data) == 0:
            return data
        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["iou_preds"]), self.box_nms_thresh)
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data), dtype=torch.long)
        return data

    def _process_batch(self, points: np.ndarray, crop_size: tuple[int, int], crop_box: list[int], orig_size: tuple[int, int]) -> _MaskData:
        orig_h, orig_w = orig_size
        predictor = self.predictor
        transformed = predictor.transform.apply_coords(points, crop_size)
        in_points = torch.as_tensor(transformed, dtype=torch.float, device=predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=predictor.device)
        masks, iou_preds, _ = predictor.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        n_out = masks.shape[1]
        data = _MaskData(
            masks=masks.flatten(0, 1).float().cpu(),
            iou_preds=iou_preds.flatten(0, 1).float().cpu(),
            points=torch.as_tensor(np.repeat(points, n_out, axis=0), dtype=torch.float),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        threshold = float(predictor.model.mask_threshold)
        data["stability_score"] = calculate_stability_score(data["masks"], threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        # Drop masks cut by a crop edge that is not an image edge (another crop sees them whole).
        near_edge = is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if near_edge.any():
            data.filter(~near_edge)
        data["rles"] = mask_to_rle(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data.columns["masks"]
        return data

    @staticmethod
    def _postprocess_small_regions(data: _MaskData, min_area: int, nms_thresh: float) -> _MaskData:
        """Fill small holes and drop small islands of each mask, then NMS preferring unchanged masks."""
        masks, scores = [], []
        for rle in data["rles"]:
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, "holes")
            mask, changed_islands = remove_small_regions(mask, min_area, "islands")
            masks.append(torch.as_tensor(mask))
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        stacked = torch.stack(masks)
        boxes = batched_mask_to_box(stacked)
        score_tensor = torch.tensor(scores)
        keep = batched_nms(boxes.float(), score_tensor, torch.zeros_like(score_tensor), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle(stacked[i][None])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data

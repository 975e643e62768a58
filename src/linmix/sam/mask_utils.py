"""Segment Anything's mask utilities: run-length encoding (uncompressed and COCO's compressed strings),
mask areas and boxes, stability scores, box IoU and NMS, point grids and crop boxes, and connected
components for removing small regions.

Layouts: masks ``[B, H, W]`` (or one ``[H, W]``) bool; boxes ``[N, 4]`` XYXY; points (x, y).
An RLE is ``{"size": [H, W], "counts": ...}`` with run lengths in column-major (Fortran) order,
starting with the number of leading zeros; ``counts`` is a list of ints (uncompressed) or COCO's
compressed string.

COCO's compressed strings come from ``pycocotools`` (the format's reference library) when it is
installed, and from the pure-Python encoder here otherwise; tests pin the two to the same strings.
No OpenCV, SciPy or torchvision: NMS and connected components are implemented here.
"""

from __future__ import annotations

import functools
import math
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "area_from_rle",
    "batched_mask_to_box",
    "batched_nms",
    "box_area",
    "box_iou",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_rle_string_to_counts",
    "counts_to_coco_rle_string",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "label_connected_components",
    "mask_to_coco_rle",
    "mask_to_rle",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]


@functools.cache
def _pycocotools_mask() -> Any:
    """``pycocotools.mask`` when installed, else None (then the pure-Python encoder is used)."""
    try:
        import pycocotools.mask as coco_mask
    except ImportError:
        return None
    return coco_mask


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
    """An RLE dict (uncompressed counts list, or a COCO compressed string / bytes) -> ``[H, W]`` bool.

    Raises ValueError when the counts are negative or do not sum to ``H * W``."""
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_rle_string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (counts < 0).any():
        raise ValueError(f"RLE counts must be >= 0, got {counts[counts < 0][:3].tolist()}")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected H * W = {h * w}")
    # Runs alternate 0, 1, 0, ... from the first count on.
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(w, h).T.copy()


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixels of an RLE (uncompressed or COCO string): the sum of the odd-numbered runs."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_rle_string_to_counts(counts)
    return int(sum(counts[1::2]))


def counts_to_coco_rle_string(counts: list[int]) -> str:
    """Run lengths -> COCO's compressed RLE string (pycocotools' when installed, else the same string
    from :func:`_counts_to_coco_rle_string_python`)."""
    coco_mask = _pycocotools_mask()
    if coco_mask is None:
        return _counts_to_coco_rle_string_python(counts)
    # The string depends only on the counts, so any size with the right pixel count will do.
    total = int(sum(counts))
    encoded = coco_mask.frPyObjects({"size": [total, 1], "counts": [int(c) for c in counts]}, total, 1)
    return encoded["counts"].decode("ascii")


def _counts_to_coco_rle_string_python(counts: list[int]) -> str:
    """pycocotools' ``rleToString`` in Python: each count, minus the count two before it from the
    fourth on, in 5-bit groups with a continuation bit, offset by 48."""
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
    """COCO's compressed RLE string -> run lengths (pycocotools' ``rleFrString``, which pycocotools does
    not expose on its own)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError(f"COCO RLE string ends inside a count: {s[-10:]!r}")
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


def mask_to_coco_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Binary masks ``[B, H, W]`` (or one ``[H, W]``) -> COCO compressed RLEs ``{"size": [H, W],
    "counts": str}`` (the records ``pycocotools.mask.encode`` writes, with ``counts`` as text)."""
    masks = torch.as_tensor(masks)
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, H, W] or [H, W], got shape {tuple(masks.shape)}")
    coco_mask = _pycocotools_mask()
    if coco_mask is None or masks.shape[0] == 0:
        return [{"size": rle["size"], "counts": _counts_to_coco_rle_string_python(rle["counts"])} for rle in mask_to_rle(masks)]
    # pycocotools takes [H, W, B] uint8 in Fortran order.
    fortran = np.asfortranarray(masks.bool().permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in coco_mask.encode(fortran)]


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



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

The mask utilities (RLE, boxes, NMS, crops, connected components) live in
:mod:`linmix.sam.mask_utils`; the names are re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linmix.sam.mask_utils import (
    area_from_rle,
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_iou,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    coco_rle_string_to_counts,
    counts_to_coco_rle_string,
    generate_crop_boxes,
    is_box_near_crop_edge,
    label_connected_components,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
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

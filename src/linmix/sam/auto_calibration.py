"""Calibration of the automatic-mask thresholds stored with a checkpoint (:mod:`linmix.sam.auto_defaults`).

Every grid-point candidate of the automatic generator (before any threshold or NMS) is computed once
with its predicted IoU, stability score, box and IoU with each true mask (:func:`candidate_scores`);
the generator's filters and box NMS are then replayed for each threshold pair
(:func:`generator_outcome`), judged by the share of true objects found by a returned mask (recall)
and the share of returned masks that are good (precision); :func:`choose_thresholds` takes the best
F1. ``benchmarks/sam_auto_calibration.py --write`` runs it for the shipped model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CandidateScores", "candidate_scores", "choose_thresholds", "generator_outcome", "threshold_table"]

class CandidateScores:
    """Every candidate mask of one image: ``predicted_iou`` ``[N]``, ``stability`` ``[N]``, ``boxes``
    ``[N, 4]`` XYXY (of the binary mask, as the generator computes them) and ``truth_iou`` ``[N, K]``
    (IoU with each of the image's K true masks)."""

    def __init__(self, predicted_iou, stability, boxes, truth_iou):
        self.predicted_iou = np.asarray(predicted_iou, dtype=np.float64).reshape(-1)
        self.stability = np.asarray(stability, dtype=np.float64).reshape(-1)
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.truth_iou = np.asarray(truth_iou, dtype=np.float64).reshape(len(self.predicted_iou), -1)

    @property
    def objects(self) -> int:
        return self.truth_iou.shape[1]

    def kept(self, pred_iou_thresh: float, stability_score_thresh: float, box_nms_thresh: float = 0.7) -> np.ndarray:
        """Indices the automatic generator keeps (its filters in its order: predicted IoU, stability,
        then box NMS by predicted IoU; one crop, no small-region post-processing)."""
        from linmix.sam.mask_utils import batched_nms

        keep = np.ones(len(self.predicted_iou), dtype=bool)
        if pred_iou_thresh > 0.0:
            keep &= self.predicted_iou > pred_iou_thresh
        if stability_score_thresh > 0.0:
            keep &= self.stability >= stability_score_thresh
        index = np.nonzero(keep)[0]
        if len(index) == 0:
            return index
        scores = torch.from_numpy(self.predicted_iou[index]).float()
        survivors = batched_nms(torch.from_numpy(self.boxes[index]).float(), scores, torch.zeros_like(scores), box_nms_thresh)
        return index[survivors.numpy()]


@torch.no_grad()
def candidate_scores(
    model: Any,
    image: np.ndarray,
    true_masks: Sequence[np.ndarray],
    *,
    points_per_side: int = 16,
    points_per_batch: int = 64,
    stability_score_offset: float = 1.0,
) -> CandidateScores:
    """Every candidate the automatic generator considers on ``image`` (three masks per grid point,
    before thresholds and NMS), with its predicted IoU, stability score, box and IoU with each true mask."""
    from linmix.sam.mask_utils import batched_mask_to_box, build_point_grid, calculate_stability_score
    from linmix.sam.predictor import RwkvSamPredictor

    truths = torch.from_numpy(np.stack([np.asarray(m, dtype=bool) for m in true_masks])).flatten(1).float()
    if truths.shape[0] == 0:
        raise ValueError("candidate_scores needs at least one true mask")
    predictor = RwkvSamPredictor(model.eval())
    predictor.set_image(image)
    height, width = image.shape[:2]
    points = build_point_grid(points_per_side) * np.array([width, height])[None]
    threshold = float(model.mask_threshold)
    predicted, stability, boxes, truth_iou = [], [], [], []
    for start in range(0, len(points), points_per_batch):
        batch = points[start : start + points_per_batch]
        coords = torch.as_tensor(predictor.transform.apply_coords(batch, (height, width)), dtype=torch.float)
        labels = torch.ones(len(batch), dtype=torch.int)
        logits, iou_predictions, _ = predictor.predict_torch(coords[:, None], labels[:, None], multimask_output=True, return_logits=True)
        logits = logits.flatten(0, 1).float()
        binary = logits > threshold
        masks = binary.flatten(1).float()
        intersection = masks @ truths.T
        union = masks.sum(1, keepdim=True) + truths.sum(1)[None] - intersection
        predicted.append(iou_predictions.flatten().float().numpy())
        stability.append(calculate_stability_score(logits, threshold, stability_score_offset).numpy())
        boxes.append(batched_mask_to_box(binary).float().numpy())
        truth_iou.append(torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union)).numpy())
    return CandidateScores(np.concatenate(predicted), np.concatenate(stability), np.concatenate(boxes), np.concatenate(truth_iou))


def generator_outcome(
    images: Sequence[CandidateScores], pred_iou_thresh: float, stability_score_thresh: float, *, good_iou: float = 0.75
) -> dict[str, float]:
    """What the automatic generator returns with these thresholds, over ``images``: ``recall`` (share
    of true objects matched by a returned mask at IoU >= ``good_iou``), ``precision`` (share of returned
    masks that match a true object at that IoU), ``masks`` (returned per image)."""
    objects = recalled = returned = good = 0
    for scores in images:
        kept = scores.kept(pred_iou_thresh, stability_score_thresh)
        objects += scores.objects
        returned += len(kept)
        if len(kept):
            matrix = scores.truth_iou[kept]
            recalled += int((matrix.max(0) >= good_iou).sum())
            good += int((matrix.max(1) >= good_iou).sum())
    return {"pred_iou_thresh": float(pred_iou_thresh), "stability_score_thresh": float(stability_score_thresh),
            "recall": recalled / max(objects, 1), "precision": good / returned if returned else math.nan,
            "masks": returned / max(len(images), 1)}


def threshold_table(
    images: Sequence[CandidateScores],
    *,
    good_iou: float = 0.75,
    pred_iou_grid: Sequence[float] = tuple(np.round(np.arange(0.0, 0.97, 0.04), 2)),
    stability_grid: Sequence[float] = tuple(np.round(np.arange(0.5, 0.99, 0.04), 2)),
) -> list[dict[str, float]]:
    """:func:`generator_outcome` for every threshold pair of the grids."""
    return [generator_outcome(images, float(p), float(s), good_iou=good_iou) for p in pred_iou_grid for s in stability_grid]


def choose_thresholds(images: Sequence[CandidateScores], *, good_iou: float = 0.75, **grids) -> dict[str, float]:
    """The threshold pair of the grids with the best F1 of ``recall`` (true objects found) and
    ``precision`` (returned masks that are good); ties go to the lower thresholds. Returns the
    :func:`generator_outcome` row of that pair, with its ``f1``."""
    table = threshold_table(images, good_iou=good_iou, **grids)
    for row in table:
        total = row["recall"] + (row["precision"] if row["masks"] else 0.0)
        row["f1"] = 2 * row["recall"] * row["precision"] / total if row["masks"] and total > 0 else 0.0
    best = max(table, key=lambda row: (round(row["f1"], 9), -row["pred_iou_thresh"] - row["stability_score_thresh"]))
    if best["f1"] == 0.0:
        raise ValueError(f"no returned mask reaches IoU {good_iou} with a true object: nothing to calibrate on")
    return best

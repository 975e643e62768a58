"""`linmix sam eval`: mIoU and boundary IoU per dataset with box and point prompts.

Protocol (HQ-SAM's, spec section 5): each ground-truth object is prompted with the tight box of its
mask (``box``) or with positive points taken from it (``point``); the predicted mask is compared with
the ground truth at the image's original resolution (:mod:`linmix.sam.metrics`). Scores are averaged
over the objects of an image, then over images (the benchmark sets have one object per image).

Point prompts are deterministic: the first point is the mask's innermost pixel (deepest under
erosion), the others are drawn (seeded by the image index) from the mask eroded to half that depth.
One point asks for SAM's three masks and keeps the one with the highest predicted IoU; more points
ask for the single mask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from linmix.sam.data import tight_box
from linmix.sam.metrics import boundary_iou, erode, mask_iou

__all__ = ["PROMPT_KINDS", "evaluate_datasets", "evaluate_model", "innermost_pixel", "point_prompt_from_mask", "results_to_markdown"]

PROMPT_KINDS = ("box", "point")


def _depth_search(mask: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The largest d with erode(mask, d) non-empty, and that eroded mask (binary search over d)."""
    low, high = 0, (min(mask.shape) + 1) // 2
    best = mask
    while low < high:
        middle = (low + high + 1) // 2
        eroded = erode(mask, middle)
        if eroded.any():
            low, best = middle, eroded
        else:
            high = middle - 1
    return low, best


def innermost_pixel(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel deepest inside ``mask`` [H, W] (Chebyshev distance to the background and
    the image edge); among ties, the one closest to their centroid."""
    tensor = torch.as_tensor(np.asarray(mask)).bool()
    if not tensor.any():
        raise ValueError("cannot pick a point in an empty mask")
    _, deepest = _depth_search(tensor)
    ys, xs = np.nonzero(deepest.numpy())
    cx, cy = xs.mean(), ys.mean()
    best = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return int(xs[best]), int(ys[best])


def point_prompt_from_mask(mask: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` positive points (see the module doc): coords ``[count, 2]`` (x, y), labels ``[count]`` ones."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    tensor = torch.as_tensor(np.asarray(mask)).bool()
    points = [innermost_pixel(mask)]
    if count > 1:
        depth, _ = _depth_search(tensor)
        region = erode(tensor, depth // 2).numpy()
        ys, xs = np.nonzero(region)
        chosen = rng.choice(len(xs), size=count - 1, replace=len(xs) < count - 1)
        points += [(int(xs[i]), int(ys[i])) for i in chosen]
    return np.array(points, dtype=np.float64), np.ones(count, dtype=np.int64)


@torch.no_grad()
def evaluate_model(
    model,
    dataset: Sequence,
    *,
    prompt_kinds: Sequence[str] = PROMPT_KINDS,
    points: int = 3,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of ``model`` (an :class:`linmix.sam.RwkvSam`) on ``dataset`` (a sequence of
    :class:`linmix.sam.data.SegmentationSample`).

    Returns ``{"dataset", "images", "objects", "seconds", "<kind>": {"miou", "boundary_iou"}}`` with
    scores in [0, 1], per-image averages over the images evaluated.
    """
    from linmix.sam.predictor import RwkvSamPredictor

    unknown = sorted(set(prompt_kinds) - set(PROMPT_KINDS))
    if unknown or not prompt_kinds:
        raise ValueError(f"prompt kinds must be a non-empty subset of {PROMPT_KINDS}, got {list(prompt_kinds)}")
    predictor = RwkvSamPredictor(model.eval())
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    per_image: dict[str, dict[str, list[float]]] = {kind: {"miou": [], "boundary_iou": []} for kind in prompt_kinds}
    objects = 0
    started = time.perf_counter()
    for index in range(count):
        sample = dataset[index]
        masks = [m for m in np.asarray(sample.masks) if m.any()]
        if not masks:
            continue
        predictor.set_image(sample.image)
        rng = np.random.default_rng([seed, index])
        scores = {kind: ([], []) for kind in prompt_kinds}
        for truth in masks:
            objects += 1
            for kind in prompt_kinds:
                if kind == "box":
                    prediction, _, _ = predictor.predict(box=tight_box(truth), multimask_output=False)
                    prediction = prediction[0]
                else:
                    coords, labels = point_prompt_from_mask(truth, points, rng)
                    multimask = points == 1
                    candidates, predicted_iou, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=multimask)
                    prediction = candidates[int(np.argmax(predicted_iou))]
                scores[kind][0].append(mask_iou(prediction, truth))
                scores[kind][1].append(boundary_iou(prediction, truth))
        for kind in prompt_kinds:
            per_image[kind]["miou"].append(float(np.mean(scores[kind][0])))
            per_image[kind]["boundary_iou"].append(float(np.mean(scores[kind][1])))
    result: dict[str, Any] = {
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "images": len(per_image[prompt_kinds[0]]["miou"]),
        "objects": objects,
        "seconds": time.perf_counter() - started,
    }
    for kind in prompt_kinds:
        result[kind] = {metric: (float(np.mean(values)) if values else math.nan) for metric, values in per_image[kind].items()}
    return result


def evaluate_datasets(model, datasets: Sequence[Sequence], **kwargs) -> list[dict[str, Any]]:
    """:func:`evaluate_model` on each dataset, in order."""
    return [evaluate_model(model, dataset, **kwargs) for dataset in datasets]


def results_to_markdown(results: Sequence[dict[str, Any]], *, model_name: str = "model") -> str:
    """A markdown table: one row per dataset, mIoU and boundary IoU (x100) for each prompt kind."""
    kinds = [kind for kind in PROMPT_KINDS if any(kind in r for r in results)]
    header = ["model", "dataset", "images"] + [f"{kind} {metric}" for kind in kinds for metric in ("mIoU", "BIoU")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [model_name, str(r["dataset"]), str(r["images"])]
        for kind in kinds:
            values = r.get(kind, {})
            row += [f"{100 * values.get('miou', math.nan):.1f}", f"{100 * values.get('boundary_iou', math.nan):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

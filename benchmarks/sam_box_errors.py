#!/usr/bin/env python
"""Where a RWKV-SAM model loses its box-prompt IoU on a segmentation split, and whether test-time
choices recover it.

For every object of every image the model gets the object's tight box (as `linmix sam eval` gives
it). Each prediction is scored with linmix.sam.metrics.mask_iou and its pixels are split into hits,
missed target, spill onto *other* objects and spill onto background (fractions of the union of
prediction and target; the hit share is the IoU). Objects are grouped by how crowded their box is: the pixels of other
objects inside the target's tight box, divided by the target's area. Note that the tables are per
object; `linmix sam eval` averages per image first, so its mIoU differs slightly.

With --variants the same boxes are also scored with test-time alternatives: the three multimask
outputs chosen by the IoU head, the best of the four outputs chosen with the ground truth (an
upper bound on any selection rule), logits averaged with a horizontally flipped image, and one
pass of refinement with the first pass's low-resolution logits as the mask prompt.

    python benchmarks/sam_box_errors.py                                   # the shipped model, procedural:1:100
    python benchmarks/sam_box_errors.py --checkpoint run.safetensors --variants
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from linmix.sam.data import load_dataset, tight_box
from linmix.sam.metrics import mask_iou

# Upper edges of the crowding groups (other objects' pixels in the box / target pixels).
CROWDING_EDGES = (0.01, 0.2, 0.5, 1.0, float("inf"))


def box_crowding(truth: np.ndarray, others: np.ndarray) -> float:
    """Pixels of ``others`` (a bool mask of all other objects) inside ``truth``'s tight box, over ``truth``'s area."""
    x0, y0, x1, y1 = tight_box(truth).astype(int)
    return float(others[y0 : y1 + 1, x0 : x1 + 1].sum()) / max(1, int(truth.sum()))


def pixel_split(prediction: np.ndarray, truth: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """Fractions of the union of ``prediction`` and ``truth``: hit, missed, on other objects, on background."""
    union = max(1, int((prediction | truth).sum()))
    spill = prediction & ~truth
    return {
        "hit": float((prediction & truth).sum()) / union,
        "missed": float((truth & ~prediction).sum()) / union,
        "on_other": float((spill & others).sum()) / union,
        "on_background": float((spill & ~others).sum()) / union,
    }


def crowding_table(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Mean IoU and pixel split per crowding group (groups with no objects are left out)."""
    table, low = [], 0.0
    for high in CROWDING_EDGES:
        group = [row for row in rows if low <= row["crowding"] < high]
        if group:
            entry = {"low": low, "high": high, "objects": len(group)}
            for key in ("iou", "hit", "missed", "on_other", "on_background"):
                entry[key] = float(np.mean([row[key] for row in group]))
            table.append(entry)
        low = high
    return table


def _flipped_box(box: np.ndarray, width: int) -> np.ndarray:
    return np.array([width - 1 - box[2], box[1], width - 1 - box[0], box[3]], dtype=box.dtype)


def analyse(model, dataset, *, limit: int | None = None, variants: bool = False) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-object rows (crowding, iou, pixel split) and, with ``variants``, mean per-object IoU of each test-time choice."""
    from linmix.sam.predictor import RwkvSamPredictor

    predictor, flipped = RwkvSamPredictor(model.eval()), RwkvSamPredictor(model)
    threshold = model.mask_threshold
    rows: list[dict[str, float]] = []
    variant_scores: dict[str, list[float]] = {}
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        sample = dataset[index]
        masks = [m for m in np.asarray(sample.masks) if m.any()]
        if not masks:
            continue
        predictor.set_image(sample.image)
        if variants:
            flipped.set_image(np.ascontiguousarray(sample.image[:, ::-1]))
        for j, truth in enumerate(masks):
            others = np.zeros_like(truth)
            for k, other in enumerate(masks):
                if k != j:
                    others |= other
            box = tight_box(truth)
            logits, single_iou, low_res = predictor.predict(box=box, multimask_output=False, return_logits=True)
            prediction = logits[0] > threshold
            rows.append({"crowding": box_crowding(truth, others), "iou": mask_iou(prediction, truth),
                         **pixel_split(prediction, truth, others)})
            if not variants:
                continue
            multi, multi_iou, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
            candidates = [logits[0]] + list(multi)
            predicted = [float(v) for v in (*single_iou, *multi_iou)]
            ious = [mask_iou(c > threshold, truth) for c in candidates]
            mirrored, _, _ = flipped.predict(box=_flipped_box(box, truth.shape[1]), multimask_output=False, return_logits=True)
            refined, _, _ = predictor.predict(box=box, mask_input=low_res, multimask_output=False, return_logits=True)
            scores = {
                "single mask (what eval uses)": ious[0],
                "best of 3 multimask by IoU head": ious[1 + int(np.argmax(predicted[1:]))],
                "best of 4 by IoU head": ious[int(np.argmax(predicted))],
                "best of 4 by ground truth (upper bound)": max(ious),
                "flip-averaged logits": mask_iou((logits[0] + mirrored[0][:, ::-1]) / 2 > threshold, truth),
                "refined with own mask prompt": mask_iou(refined[0] > threshold, truth),
            }
            for name, value in scores.items():
                variant_scores.setdefault(name, []).append(value)
    return rows, {name: float(np.mean(values)) for name, values in variant_scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a linmix RWKV-SAM safetensors file (default: the shipped model)")
    parser.add_argument("--dataset", default="procedural:1:100", help="a `linmix sam eval` dataset spec")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--variants", action="store_true", help="also score test-time alternatives")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from linmix.sam.model import build_rwkv_sam, checkpoint_metadata, load_default

    if args.checkpoint:
        model = build_rwkv_sam(checkpoint_metadata(args.checkpoint)["variant"], checkpoint=args.checkpoint)
    else:
        model = load_default()
    dataset = load_dataset(args.dataset)
    rows, variant_scores = analyse(model, dataset, limit=args.limit, variants=args.variants)
    print(f"{args.checkpoint or 'shipped model'} on {args.dataset}: {len(rows)} box-prompted objects, "
          f"mean IoU per object {np.mean([r['iou'] for r in rows]):.3f}")
    print("\n| other objects in the box / target area | objects | IoU (= hit share) | missed | on other objects | on background |")
    print("|---|---|---|---|---|---|")
    for entry in crowding_table(rows):
        span = f"{entry['low']:g} - {entry['high']:g}" if entry["high"] != float("inf") else f">= {entry['low']:g}"
        print(f"| {span} | {entry['objects']} | {entry['iou']:.3f} | {entry['missed']:.3f} "
              f"| {entry['on_other']:.3f} | {entry['on_background']:.3f} |")
    if variant_scores:
        print("\n| box prompt, test-time choice | mean IoU per object |\n|---|---|")
        for name, value in variant_scores.items():
            print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

With --probes it asks where the information that tells the target from the other objects is lost:
at the model's low-resolution logit grid, inside each target's box (grown by two grid cells), a
class-balanced logistic regression is fitted per object on half of the cells (a checkerboard of
4 x 4 blocks) and scored (IoU with the target) on the other half, for each of: the decoder's
prompt-conditioned map that the mask token's hypernetwork output is dotted with (the model's own
readout is one point of that family), the image encoder's outputs (embedding, stage-2 and stage-1
maps upsampled to the grid), the stage-1 map alone, the input image's colour (each cell's 4 x 4
RGB pixels), and, as a control for what position alone can draw, random Fourier features of the
cell position with as many channels as the encoder outputs. A probe is an upper bound fitted with
the answer; a large gap between two stages says the later one drops what the earlier one had.

    python benchmarks/sam_box_errors.py                                   # the shipped model, procedural:1:100
    python benchmarks/sam_box_errors.py --checkpoint run.safetensors --variants
    python benchmarks/sam_box_errors.py --probes --limit 30
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

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


def prompted_objects(dataset, limit: int | None = None):
    """``(sample, truth, others)`` for every non-empty object of the first ``limit`` images (all by
    default), ``others`` being the union of that image's other objects; a sample's objects come in a row."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        sample = dataset[index]
        masks = [m for m in np.asarray(sample.masks) if m.any()]
        for j, truth in enumerate(masks):
            others = np.zeros_like(truth)
            for k, other in enumerate(masks):
                if k != j:
                    others |= other
            yield sample, truth, others


def crowding_table(rows: list[dict[str, float]], keys=("iou", "hit", "missed", "on_other", "on_background")) -> list[dict[str, float]]:
    """Mean of ``keys`` (default: IoU and pixel split) per crowding group (groups with no objects are left out)."""
    table, low = [], 0.0
    for high in CROWDING_EDGES:
        group = [row for row in rows if low <= row["crowding"] < high]
        if group:
            entry = {"low": low, "high": high, "objects": len(group)}
            for key in keys:
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
    current = None
    for sample, truth, others in prompted_objects(dataset, limit):
        if sample is not current:
            current = sample
            predictor.set_image(sample.image)
            if variants:
                flipped.set_image(np.ascontiguousarray(sample.image[:, ::-1]))
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


PROBES = ("model's own logits", "decoder map", "encoder outputs", "stage-1 map", "image colour (4x4 px)", "position only (control)")


def fit_linear_probe(features: torch.Tensor, target: torch.Tensor, train: torch.Tensor, *, l2: float = 1e-3) -> torch.Tensor:
    """Logits for every row of ``features`` [N, C] from a logistic regression fitted on the ``train`` rows
    against ``target`` [N] (0/1): features standardised on the training rows, both classes weighted
    equally, L2 penalty ``l2`` on the weights, L-BFGS."""
    x = features.double()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = target.double()[train]
    positive = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[train] @ w, y, weight=weight) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (x @ w).detach().float()


def _cell_iou(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    union = int((prediction | truth).sum())
    return float((prediction & truth).sum()) / union if union else 1.0


class _DecoderMapTap:
    """Keeps the decoder's last fused (or upscaled) map: what the hypernetwork output is dotted with."""

    def __init__(self, decoder):
        self.decoder, self.map = decoder, None

    def __enter__(self):
        decoder = self.decoder
        if getattr(decoder, "hq_fusion", False):
            original = decoder._hq_fuse

            def tapped(*args, **kwargs):
                self.map = original(*args, **kwargs).detach()
                return self.map

            decoder._hq_fuse = tapped
            self._undo = lambda: delattr(decoder, "_hq_fuse")
        else:
            handle = decoder.output_upscaling.register_forward_hook(lambda _m, _i, out: setattr(self, "map", out.detach()))
            self._undo = handle.remove
        return self

    def __exit__(self, *exc):
        self._undo()


def probe(model, dataset, *, limit: int | None = None) -> list[dict[str, float]]:
    """Per box-prompted object: crowding and the held-out-cell IoU of each of :data:`PROBES` (see the module doc)."""
    from linmix.sam.predictor import RwkvSamPredictor

    predictor = RwkvSamPredictor(model.eval())
    rows: list[dict[str, float]] = []
    generator = torch.Generator().manual_seed(0)
    frame = model.image_size
    grid = frame // 4
    rows_index, cols_index = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    held_out = ((rows_index // 4 + cols_index // 4) % 2 == 1).flatten()
    current = None
    with _DecoderMapTap(model.mask_decoder) as tap:
        for sample, truth, others in prompted_objects(dataset, limit):
            if sample is not current:  # the per-image maps, once for all of the image's objects
                current = sample
                predictor.set_image(sample.image)
                features = predictor.get_image_features()
                if features.hq_features is None:
                    raise ValueError("--probes needs a model with the high-quality fusion (its stage-1 and stage-2 maps)")
                height, width = predictor.input_size
                embedding, (stage1, stage2) = features.embedding, features.hq_features
                embedding, stage1, stage2 = (F.interpolate(t.float(), (grid, grid), mode="bilinear", align_corners=False)[0]
                                             for t in (embedding, stage1, stage2))
                encoder = torch.cat([embedding, stage2, stage1])
                image = torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                image = F.interpolate(image, (height, width), mode="bilinear", align_corners=False, antialias=True)
                colour = F.unfold(F.pad(image, (0, frame - width, 0, frame - height)), 4, stride=4).view(-1, grid, grid)
                frequencies = torch.randn(2, encoder.shape[0], generator=generator) * 0.3
                phases = torch.rand(encoder.shape[0], generator=generator) * 2 * np.pi
                position = torch.cos(torch.stack([rows_index, cols_index], -1).float() @ frequencies + phases).permute(2, 0, 1)
                valid = (rows_index < (height + 3) // 4) & (cols_index < (width + 3) // 4)
                scale = height / sample.image.shape[0]
            box = tight_box(truth)
            _, _, low_res = predictor.predict(box=box, multimask_output=False, return_logits=True)
            target = torch.from_numpy(truth.astype(np.float32))[None, None]
            target = F.interpolate(target, (height, width), mode="bilinear", align_corners=False, antialias=True)
            target = (F.avg_pool2d(F.pad(target, (0, frame - width, 0, frame - height)), 4)[0, 0] > 0.5).flatten()
            x0, y0, x1, y1 = (box * scale / 4).astype(int)
            region = (valid & (cols_index >= x0 - 2) & (cols_index <= x1 + 2) & (rows_index >= y0 - 2) & (rows_index <= y1 + 2)).flatten()
            train, test = region & ~held_out, region & held_out
            if train.sum() < 2 or test.sum() < 1 or target[train].all() or not target[train].any():
                continue
            row = {"crowding": box_crowding(truth, others),
                   PROBES[0]: _cell_iou(torch.from_numpy(low_res[0]).flatten()[test] > 0, target[test])}
            for name, cells in zip(PROBES[1:], (tap.map[0], encoder, stage1, colour, position)):
                logits = fit_linear_probe(cells.flatten(1).T[region], target[region], train[region])
                row[name] = _cell_iou(logits[test[region]] > 0, target[test])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a linmix RWKV-SAM safetensors file (default: the shipped model)")
    parser.add_argument("--dataset", default="procedural:1:100", help="a `linmix sam eval` dataset spec")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--variants", action="store_true", help="also score test-time alternatives")
    parser.add_argument("--probes", action="store_true", help="linear probes: where the target's identity is lost")
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
    if args.probes:
        rows = probe(model, dataset, limit=args.limit)
        print(f"{args.checkpoint or 'shipped model'} on {args.dataset}: {len(rows)} box-prompted objects; IoU on held-out "
              "cells of the logit grid inside each box, of the model's own mask and of linear probes fitted per object")
        print("\n| other objects in the box / target area | objects | " + " | ".join(PROBES) + " |")
        print("|---|---|" + "---|" * len(PROBES))
        for entry in crowding_table(rows, keys=PROBES) + [{"low": None, "objects": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in PROBES}}]:
            span = "all" if entry["low"] is None else (f"{entry['low']:g} - {entry['high']:g}" if entry["high"] != float("inf") else f">= {entry['low']:g}")
            print(f"| {span} | {entry['objects']} | " + " | ".join(f"{entry[k]:.3f}" for k in PROBES) + " |")
        return 0
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

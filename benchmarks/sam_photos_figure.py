#!/usr/bin/env python
"""An overview figure of a RWKV-SAM model on HELD-OUT photographs: what it does outside its training data.

Rows 1..N: items of the copy-paste source's held-out split (``copypaste:SEED:...:split=heldout``: photographs
and cut-outs that no training item uses) with their exact object masks. For each, three panels:

- **box**: the tight box of the largest pasted object as the prompt, the predicted mask (tinted) and the
  true mask (white outline), titled with the IoU;
- **point**: one point deep inside the second largest object (the largest when there is one), likewise;
- **automatic**: every mask of the automatic mask generator (a grid of points, the model's stored
  thresholds, as ``linmix sam auto`` uses them), each in its own colour, titled with the mask count.

Last row: a held-out background photograph itself, with nothing pasted (a "natural" photograph; a JPEG
of the held-out split is preferred), with a box and a point at fixed relative positions (box
0.25..0.75 of each side, point at (0.5, 0.5) of the image) and the automatic masks. It has no truth, so
its titles give the predicted IoU (the model's own score) instead.

Also prints a table (per image: box IoU, point IoU, automatic mask count). Deterministic for a seed.
The figure is a palette PNG (256 colours) to keep it small.

    python benchmarks/sam_photos_figure.py                          # the shipped model -> docs/sam-photos.png
    python benchmarks/sam_photos_figure.py --checkpoint run.safetensors --out run-photos.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The "natural" photograph's prompts, as fractions of (width, height).
NATURAL_BOX = (0.25, 0.25, 0.75, 0.75)
NATURAL_POINT = (0.5, 0.5)
NATURAL_MAX_SIDE = 448


@dataclass
class PhotoRow:
    """One figure row: the image, the prompts, the masks and the scores (None where there is no truth)."""

    name: str
    image: np.ndarray
    box: np.ndarray  # XYXY pixels
    point: np.ndarray  # (x, y) pixels
    box_mask: np.ndarray
    point_mask: np.ndarray
    box_truth: np.ndarray | None
    point_truth: np.ndarray | None
    box_score: float  # the model's predicted IoU of its mask
    point_score: float
    auto_masks: np.ndarray = field(repr=False)  # [N, H, W] bool, largest first
    box_iou: float | None = None
    point_iou: float | None = None

    @property
    def auto_count(self) -> int:
        return int(len(self.auto_masks))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def interior_point(mask: np.ndarray) -> np.ndarray:
    """A pixel deep inside ``mask``: erode (4-neighbour) until one more step would empty it, then take the
    remaining pixel nearest the remaining part's centroid. Returns (x, y) pixel centres."""
    core = np.asarray(mask, dtype=bool)
    if not core.any():
        raise ValueError("cannot place a point in an empty mask")
    while True:
        padded = np.pad(core, 1, constant_values=False)
        eroded = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        if not eroded.any():
            break
        core = eroded
    ys, xs = np.nonzero(core)
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return np.array([xs[nearest], ys[nearest]], dtype=np.float64)


def _prompted(predictor, image, box, point, box_truth, point_truth, name, generator) -> PhotoRow:
    from linmix.segment import segment

    predictor.set_image(image)
    by_box = segment(predictor, box=tuple(float(v) for v in box))
    by_point = segment(predictor, points=[(float(point[0]), float(point[1]))], labels=[1])
    records = sorted(generator.generate(image), key=lambda record: -record["area"])
    auto = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, *image.shape[:2]), dtype=bool)
    row = PhotoRow(
        name, image, np.asarray(box, dtype=np.float64), np.asarray(point, dtype=np.float64),
        by_box.best_mask, by_point.best_mask, box_truth, point_truth,
        float(by_box.scores[by_box.best]), float(by_point.scores[by_point.best]), auto,
    )
    if box_truth is not None:
        row.box_iou = mask_iou(row.box_mask, box_truth)
    if point_truth is not None:
        row.point_iou = mask_iou(row.point_mask, point_truth)
    return row


def heldout_rows(model, dataset, count: int, generator) -> list[PhotoRow]:
    """The first ``count`` items of ``dataset`` (in index order) with at least two objects, or with one
    when too few have two: box on the largest object, point on the second largest."""
    from linmix.sam import RwkvSamPredictor
    from linmix.sam.data import tight_box

    predictor = RwkvSamPredictor(model)
    chosen, single = [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        (chosen if len(sample.masks) >= 2 else single).append(sample)
        if len(chosen) == count:
            break
    chosen = (chosen + single)[:count]
    rows = []
    for sample in chosen:
        order = np.argsort([-int(m.sum()) for m in sample.masks], kind="stable")
        box_truth = sample.masks[order[0]]
        point_truth = sample.masks[order[1] if len(order) > 1 else order[0]]
        rows.append(_prompted(predictor, sample.image, tight_box(box_truth), interior_point(point_truth),
                              box_truth, point_truth, sample.name, generator))
    return rows


def natural_photo(dataset) -> tuple[str, np.ndarray]:
    """A held-out background photograph of ``dataset`` as it is (a JPEG when there is one: the
    photographs; PNGs are often drawn), scaled to at most NATURAL_MAX_SIDE pixels."""
    from PIL import Image

    photos = [p for p in dataset.backgrounds if p.suffix.lower() in (".jpg", ".jpeg")] or list(dataset.backgrounds)
    path = photos[0]
    with Image.open(path) as picture:
        picture.draft("RGB", (2 * NATURAL_MAX_SIDE, 2 * NATURAL_MAX_SIDE))
        picture = picture.convert("RGB")
        scale = min(1.0, NATURAL_MAX_SIDE / max(picture.size))
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.LANCZOS)
        return path.name, np.array(picture)  # writable: torch warns on a read-only array


def natural_row(model, dataset, generator) -> PhotoRow:
    from linmix.sam import RwkvSamPredictor

    name, image = natural_photo(dataset)
    height, width = image.shape[:2]
    box = np.array(NATURAL_BOX) * [width, height, width, height]
    point = np.array(NATURAL_POINT) * [width, height]
    return _prompted(RwkvSamPredictor(model), image, box, point, None, None, f"{name} (nothing pasted)", generator)


def draw_figure(rows: list[PhotoRow], out: Path, title: str) -> Path:
    """Three panels per row (box, point, automatic); a 256-colour PNG at ``out``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from linmix.tour import distinct_colors
    from linmix.visualize import MASK_COLORS, overlay_masks

    figure, axes = plt.subplots(len(rows), 3, figsize=(9.6, 3.3 * len(rows)), squeeze=False)
    for row, (ax_box, ax_point, ax_auto) in zip(rows, axes):
        for ax, kind, mask, truth, iou, score in (
            (ax_box, "box", row.box_mask, row.box_truth, row.box_iou, row.box_score),
            (ax_point, "point", row.point_mask, row.point_truth, row.point_iou, row.point_score),
        ):
            prompts = {"boxes": row.box[None]} if kind == "box" else {"points": row.point[None], "labels": [1]}
            ax.imshow(overlay_masks(row.image, mask[None], colors=[MASK_COLORS[0]], alpha=0.5, **prompts))
            if truth is not None:
                # White over black: the true outline reads on light and dark photographs alike.
                ax.contour(truth, levels=[0.5], colors="black", linewidths=2.2)
                ax.contour(truth, levels=[0.5], colors="white", linewidths=1.0)
                ax.set_title(f"{kind}: IoU {iou:.2f} vs truth", fontsize=9)
            else:
                ax.set_title(f"{kind}: no truth (predicted IoU {score:.2f})", fontsize=9)
        ax_auto.imshow(overlay_masks(row.image, row.auto_masks, colors=distinct_colors(row.auto_count), alpha=0.45))
        ax_auto.set_title(f"automatic: {row.auto_count} mask{'s' if row.auto_count != 1 else ''}", fontsize=9)
        ax_box.set_ylabel(row.name, fontsize=8)
        for ax in (ax_box, ax_point, ax_auto):
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.16 / len(rows)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    plt.close(figure)
    buffer.seek(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buffer) as picture:
        picture.convert("RGB").quantize(256).save(out, optimize=True)
    return out


def format_table(rows: list[PhotoRow]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = ["| image | size | box IoU | point IoU | automatic masks |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.image.shape[1]}x{row.image.shape[0]} | {cell(row.box_iou)} | "
                     f"{cell(row.point_iou)} | {row.auto_count} |")
    return "\n".join(lines)


def main(argv=None) -> list[PhotoRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a linmix RWKV-SAM safetensors file (default: the shipped model)")
    parser.add_argument("--out", default="docs/sam-photos.png", help="the figure (PNG)")
    parser.add_argument("--seed", type=int, default=1, help="copy-paste seed (held-out split)")
    parser.add_argument("--images", type=int, default=4, help="held-out copy-paste images")
    parser.add_argument("--points-per-side", type=int, default=16, help="automatic generator's grid")
    parser.add_argument("--size", default="256-448", help="copy-paste image sides MIN-MAX")
    parser.add_argument("--backgrounds", help="photograph folder(s), comma-separated (default: the installed wallpapers)")
    parser.add_argument("--objects", help="RGBA cut-out folder(s), comma-separated")
    parser.add_argument("--emoji", help="colour emoji font, or none (default: the installed Noto Color Emoji)")
    parser.add_argument("--heldout-every", type=int, default=8, help="1 in N sources held out (as the training used)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.images < 1 or args.points_per_side < 1:
        parser.error("--images and --points-per-side must be >= 1")
    low, _, high = args.size.partition("-")
    import torch

    torch.set_num_threads(args.threads)
    from linmix.sam import AutomaticMaskGenerator
    from linmix.sam.auto_defaults import automatic_mask_defaults_for
    from linmix.sam.data.copypaste import CopyPasteDataset
    from linmix.segment import load_sam_model

    model = load_sam_model(args.checkpoint)
    dataset = CopyPasteDataset(
        args.seed, 10 * args.images + 10, split="heldout", min_objects=2, max_objects=4,
        min_side=int(low), max_side=int(high or low), heldout_every=args.heldout_every,
        backgrounds=args.backgrounds.split(",") if args.backgrounds else None,
        objects=args.objects.split(",") if args.objects else None, emoji=args.emoji,
    )
    thresholds = automatic_mask_defaults_for(model, args.checkpoint)
    generator = AutomaticMaskGenerator(model, points_per_side=args.points_per_side, output_mode="binary_mask", **thresholds)
    rows = heldout_rows(model, dataset, args.images, generator) + [natural_row(model, dataset, generator)]
    name = Path(args.checkpoint).name if args.checkpoint else "shipped RWKV-SAM (procedural shapes only)"
    title = (f"{name} on held-out photographs (copypaste:{args.seed}:split=heldout)\n"
             "tint: predicted mask; white outline: true mask; yellow: box prompt; green dot: point prompt\n"
             f"automatic: {args.points_per_side}x{args.points_per_side} points, predicted IoU > "
             f"{thresholds['pred_iou_thresh']:.2f}, stability >= {thresholds['stability_score_thresh']:.2f} "
             "(the model's stored thresholds)")
    out = draw_figure(rows, Path(args.out), title)
    print(format_table(rows))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)

"""Calibrate the automatic-mask thresholds of the shipped RWKV-SAM model and store them beside its weights.

Runs the shipped model's automatic mask generator candidates on the bundled example images and the
first images of the procedural held-out split, replays the generator's filters for every threshold
pair (:mod:`linmix.sam.auto_calibration`) and prints the table; ``--write`` stores the chosen pair in
``<weights>.auto_masks.json``, which ``linmix sam auto`` and the automatic mask generator then use::

    python benchmarks/sam_auto_calibration.py --save-scores scores.npz        # ~25 min of model time on 2 cores
    python benchmarks/sam_auto_calibration.py --scores scores.npz --write      # reuse the scores, write the sidecar
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from linmix.sam.auto_calibration import CandidateScores, candidate_scores, choose_thresholds, generator_outcome
from linmix.sam.auto_defaults import write_automatic_mask_defaults

_COLUMNS = ("predicted_iou", "stability", "boxes", "truth_iou")


def save_candidate_scores(path: str, names: Sequence[str], images: Sequence[CandidateScores]) -> None:
    """Plain arrays in an ``.npz`` (nothing pickled): ``names`` and ``{column}_{index}`` per image."""
    arrays = {"names": np.array(list(names), dtype=str)}
    for index, image in enumerate(images):
        arrays.update({f"{column}_{index}": getattr(image, column) for column in _COLUMNS})
    np.savez(path, **arrays)


def load_candidate_scores(path: str) -> tuple[list[str], list[CandidateScores]]:
    with np.load(path, allow_pickle=False) as data:
        names = [str(name) for name in data["names"]]
        return names, [CandidateScores(**{column: data[f"{column}_{index}"] for column in _COLUMNS}) for index in range(len(names))]


def _calibration_images(procedural_images: int) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    from linmix.data.examples import EXAMPLES, load_example_image, render_example
    from linmix.sam.data import ProceduralHQDataset

    items = [(e.name, load_example_image(e.name), list(render_example(e.name)[1].values())) for e in EXAMPLES]
    dataset = ProceduralHQDataset(1, procedural_images)  # seed 1: not a training seed of the shipped model
    for index in range(procedural_images):
        sample = dataset[index]
        items.append((sample.name, sample.image, [m for m in sample.masks if m.any()]))
    return items


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the shipped model's automatic masks and print (or ``--write``) its thresholds."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--procedural-images", type=int, default=20, help="Procedural held-out images (seed 1) besides the bundled examples.")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--good-iou", type=float, default=0.75)
    parser.add_argument("--write", action="store_true", help="Write the sidecar next to the shipped weights.")
    parser.add_argument("--save-scores", help="Also save the candidates' scores to this .npz file (plain arrays).")
    parser.add_argument("--scores", help="Reuse the scores saved by --save-scores instead of running the model.")
    args = parser.parse_args(argv)

    from linmix.sam.model import build_rwkv_sam, checkpoint_metadata, default_checkpoint_path

    path = default_checkpoint_path()
    if args.scores:
        names, images = load_candidate_scores(args.scores)
    else:
        model = build_rwkv_sam(checkpoint_metadata(path)["variant"], checkpoint=path).eval()
        names, images = [], []
        for name, image, truths in _calibration_images(args.procedural_images):
            names.append(name)
            images.append(candidate_scores(model, image, truths, points_per_side=args.points_per_side))
            print(f"{name}: {len(images[-1].predicted_iou)} candidates", flush=True)
        if args.save_scores:
            save_candidate_scores(args.save_scores, names, images)
    chosen = choose_thresholds(images, good_iou=args.good_iou)
    examples = [name for name in names if not name.startswith("procedural-")]
    described = (f"{len(names)} images: the bundled examples ({', '.join(examples)}) and the first "
                 f"{len(names) - len(examples)} of procedural:1; {sum(s.objects for s in images)} objects")
    print(described)
    print("| pred_iou_thresh | stability_thresh | objects found (IoU >= good) | returned masks that are good | masks per image |")
    print("|---|---|---|---|---|")
    pairs = [(0.88, 0.95), (0.88, 0.92), (0.7, 0.9), (0.6, 0.85), (chosen["pred_iou_thresh"], chosen["stability_score_thresh"]), (0.3, 0.7), (0.0, 0.0)]
    for p, s in pairs:
        row = generator_outcome(images, p, s, good_iou=args.good_iou)
        print(f"| {p:.2f} | {s:.2f} | {row['recall']:.3f} | {row['precision']:.3f} | {row['masks']:.1f} |")
    print(f"chosen: {chosen}")
    if args.write:
        sam = generator_outcome(images, 0.88, 0.95, good_iou=args.good_iou)
        measured = {
            "images": described,
            "points_per_side": args.points_per_side,
            "good_iou": args.good_iou,
            "rule": "best F1 of recall and precision on a 0.04 grid",
            "recall": round(chosen["recall"], 4),
            "precision": round(chosen["precision"], 4),
            "f1": round(chosen["f1"], 4),
            "masks_per_image": round(chosen["masks"], 2),
            "sam_defaults_recall": round(sam["recall"], 4),
            "command": "python benchmarks/sam_auto_calibration.py --write",
        }
        print(f"wrote {write_automatic_mask_defaults(path, chosen, measured)}")


if __name__ == "__main__":
    main()

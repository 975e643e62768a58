"""Segmentation for people: read an image file, load a model, run prompts, write PNGs and JSON.

The pieces behind ``linmix sam segment``, ``linmix sam auto``, ``linmix tour`` and the web demo::

    model = load_sam_model()                        # the shipped model (linmix.sam.load_default)
    image = read_image("photo.jpg")                 # HxWx3 uint8 RGB
    result = segment(model, image, points=[(120, 80)], labels=[1])
    write_segmentation(result, image, "out/", stem="photo")   # photo.mask.png, photo.overlay.png, photo.scores.json

Prompts are in original-image pixels: points (x, y) with labels 1 foreground / 0 background,
a box XYXY.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linmix.utils.images import read_rgb as read_image  # the package's one image reader, under its CLI name
from linmix.visualize import overlay_masks, save_png

if TYPE_CHECKING:
    from linmix.sam import RwkvSam

__all__ = [
    "IMAGE_SUFFIXES",
    "SegmentationResult",
    "automatic_masks",
    "load_sam_model",
    "parse_box",
    "parse_point",
    "read_image",
    "segment",
    "write_automatic_masks",
    "write_segmentation",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_sam_model(checkpoint: str | PathLike[str] | None = None, variant: str | None = None) -> RwkvSam:
    """The shipped RWKV-SAM model (``checkpoint=None``) or one from a safetensors file.

    A file written by ``save_rwkv_sam`` names its variant in its metadata; pass ``variant`` for one
    that does not. Raises FileNotFoundError when the file (or the shipped weights) is missing.
    """
    import linmix.sam as sam
    from linmix.sam.model import checkpoint_metadata

    if checkpoint is None:
        if variant is not None:
            raise ValueError("--variant needs --checkpoint (the shipped model has its own variant)")
        return sam.load_default()
    checkpoint = Path(checkpoint)
    metadata = checkpoint_metadata(checkpoint)
    variant = variant or metadata.get("variant")
    if variant is None:
        raise ValueError(f"{checkpoint} does not record its variant: pass one of tiny, small, base, large")
    return sam.build_rwkv_sam(variant, checkpoint=checkpoint)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> four floats (pixels, XYXY)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(f"a box is four numbers x0,y0,x1,y1 (pixels), got {text!r}")
    if values[0] > values[2] or values[1] > values[3]:
        raise ValueError(f"a box is x0,y0,x1,y1 with x0 <= x1 and y0 <= y1, got {text!r}")
    return values  # type: ignore[return-value]


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` (label 1 foreground, the default, or 0 background) -> (x, y, label)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or not all(np.isfinite(numbers)):
        raise ValueError(f"a point is x,y or x,y,label (label 1 foreground, 0 background), got {text!r}")
    label = 1 if len(numbers) == 2 else numbers[2]
    if label not in (0, 1):
        raise ValueError(f"a point's label must be 1 (foreground) or 0 (background), got {text!r}")
    return numbers[0], numbers[1], int(label)


@dataclass
class SegmentationResult:
    """Masks for one prompt: ``masks`` CxHxW bool, ``scores`` C predicted IoUs, ``best`` the index of
    the highest score, and the prompt that made them (``points`` Nx2, ``labels`` N, ``box`` XYXY)."""

    masks: np.ndarray
    scores: np.ndarray
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def best_mask(self) -> np.ndarray:
        return self.masks[self.best]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: scores, best index, mask areas in pixels, the prompt."""
        return {
            "scores": [round(float(s), 6) for s in self.scores],
            "best": self.best,
            "areas": [int(m.sum()) for m in self.masks],
            "image_size": {"height": int(self.masks.shape[1]), "width": int(self.masks.shape[2])},
            "points": None if self.points is None else self.points.tolist(),
            "labels": None if self.labels is None else [int(v) for v in self.labels],
            "box": None if self.box is None else self.box.tolist(),
            **self.extra,
        }


def segment(
    model_or_predictor: Any,
    image: np.ndarray | None = None,
    *,
    points: Sequence[Sequence[float]] | None = None,
    labels: Sequence[int] | None = None,
    box: Sequence[float] | None = None,
    multimask: bool | None = None,
) -> SegmentationResult:
    """Masks for one prompt.

    Args:
        model_or_predictor: an RwkvSam (``image`` is encoded) or an RwkvSamPredictor with its image
            already set (``image`` None: reuse its embedding).
        points: Nx2 (x, y) pixels of the original image; labels N (1 foreground, 0 background;
            default all foreground).
        box: XYXY pixels.
        multimask: 3 candidate masks (SAM's choice for an ambiguous prompt) or 1; default: 3 for a
            single point without a box, else 1.
    """
    from linmix.sam import RwkvSamPredictor

    if points is None and box is None:
        raise ValueError("give a prompt: at least one point or a box")
    if isinstance(model_or_predictor, RwkvSamPredictor):
        predictor = model_or_predictor
        if image is not None:
            predictor.set_image(image)
    else:
        if image is None:
            raise ValueError("an image is needed with a model (or pass a predictor whose image is set)")
        predictor = RwkvSamPredictor(model_or_predictor)
        predictor.set_image(image)
    coords = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
    point_labels = None
    if coords is not None:
        point_labels = np.ones(len(coords), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    box_array = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
    if multimask is None:
        multimask = coords is not None and len(coords) == 1 and box_array is None
    masks, scores, _ = predictor.predict(
        point_coords=coords, point_labels=point_labels, box=box_array, multimask_output=bool(multimask)
    )
    return SegmentationResult(masks=masks.astype(bool), scores=scores, points=coords, labels=point_labels, box=box_array)


def write_segmentation(result: SegmentationResult, image: np.ndarray, out_dir: str | PathLike[str], stem: str) -> dict[str, Path]:
    """Write ``{stem}.mask.png`` (best mask, 255 inside), ``{stem}.overlay.png`` (best mask and prompt
    over the image), ``{stem}.scores.json``, and with several candidates ``{stem}.mask{i}.png`` each.
    Returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "mask": save_png(result.best_mask, out / f"{stem}.mask.png"),
        "overlay": save_png(
            overlay_masks(image, result.best_mask, points=result.points, labels=result.labels,
                          boxes=None if result.box is None else result.box[None]),
            out / f"{stem}.overlay.png",
        ),
    }
    if len(result.masks) > 1:
        for index, mask in enumerate(result.masks):
            paths[f"mask{index}"] = save_png(mask, out / f"{stem}.mask{index}.png")
    scores_path = out / f"{stem}.scores.json"
    scores_path.write_text(json.dumps(result.summary(), indent=2) + "\n")
    paths["scores"] = scores_path
    return paths


def automatic_masks(model: RwkvSam, image: np.ndarray, **generator_options: Any) -> list[dict[str, Any]]:
    """Segment Anything's automatic masks as COCO RLE records (``AutomaticMaskGenerator`` options pass through)."""
    from linmix.sam import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(model, output_mode="coco_rle", **generator_options)
    return generator.generate(image)


def write_automatic_masks(records: list[dict[str, Any]], image: np.ndarray, out_dir: str | PathLike[str], stem: str) -> dict[str, Path]:
    """Write ``{stem}.masks.json`` (the records, COCO RLE) and ``{stem}.overlay.png`` (every mask, largest
    first so small ones stay visible). Returns the paths by kind."""
    from linmix.sam.automatic_mask_generator import coco_rle_string_to_counts, rle_to_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.masks.json"
    json_path.write_text(json.dumps(records) + "\n")
    ordered = sorted(records, key=lambda record: -record["area"])
    masks = [
        rle_to_mask({"size": r["segmentation"]["size"], "counts": coco_rle_string_to_counts(r["segmentation"]["counts"])})
        for r in ordered
    ]
    stack = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)
    overlay = save_png(overlay_masks(image, stack, alpha=0.45), out / f"{stem}.overlay.png")
    return {"masks": json_path, "overlay": overlay}

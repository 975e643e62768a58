"""`linmix sam segment | auto | export-onnx`: promptable and automatic segmentation from the shell.

(`sam train | eval | dump-teacher` live in ``linmix.cli.sam_train``.) Model loading, prompts and the
files written are in :mod:`linmix.segment`; heavy imports stay inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from linmix.cli.app import CliError, sam_app

CHECKPOINT_HELP = "A linmix RWKV-SAM safetensors file; default: the shipped model (linmix.sam.load_default)."
VARIANT_HELP = "Backbone variant of --checkpoint (tiny, small, base, large) when its metadata does not say."


def _load(checkpoint: Optional[Path], variant: Optional[str]):
    from linmix.segment import load_sam_model

    return load_sam_model(checkpoint, variant)


@sam_app.command(
    "segment",
    epilog=(
        "Examples:\n\n"
        "  linmix sam segment photo.jpg --box 40,60,220,300 --out masks/\n\n"
        "  linmix sam segment photo.jpg --point 120,80 --point 200,90,0 --out masks/   (0 = background)\n\n"
        "Writes OUT/STEM.mask.png (best mask, 255 inside), OUT/STEM.overlay.png and OUT/STEM.scores.json "
        "(predicted IoU of each candidate); with several candidates also OUT/STEM.mask0.png, mask1, ..."
    ),
)
def segment_command(
    image: Path = typer.Argument(..., help="Image file (PNG, JPEG, WebP, ...)."),
    box: Optional[str] = typer.Option(None, "--box", help="Box prompt x0,y0,x1,y1 in pixels."),
    point: Optional[list[str]] = typer.Option(
        None, "--point", help="Point prompt x,y or x,y,label (label 1 foreground, the default; 0 background). Repeatable."
    ),
    out: Path = typer.Option(Path("segment-out"), "--out", help="Folder for the mask, overlay and scores."),
    multimask: Optional[bool] = typer.Option(
        None, "--multimask/--single-mask",
        help="3 candidate masks or 1; default: 3 for a lone point (an ambiguous prompt), else 1.",
    ),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    variant: Optional[str] = typer.Option(None, "--variant", help=VARIANT_HELP),
) -> None:
    """Segment one object of IMAGE from a box and/or points: mask PNG, overlay PNG, scores JSON."""
    from linmix.segment import parse_box, parse_point, read_image, segment, write_segmentation

    if box is None and not point:
        raise CliError("give a prompt: --box x0,y0,x1,y1 and/or one or more --point x,y[,label]")
    box_values = parse_box(box) if box is not None else None
    parsed = [parse_point(text) for text in point or []]
    pixels = read_image(image)
    model = _load(checkpoint, variant)
    result = segment(
        model, pixels,
        points=[(x, y) for x, y, _ in parsed] if parsed else None,
        labels=[label for _, _, label in parsed] if parsed else None,
        box=box_values,
        multimask=multimask,
    )
    paths = write_segmentation(result, pixels, out, stem=image.stem)
    scores = ", ".join(f"{s:.3f}" for s in result.scores)
    typer.echo(f"{len(result.masks)} mask(s), predicted IoU {scores}; best #{result.best} covers {int(result.best_mask.sum())} px")
    for kind in ("mask", "overlay", "scores"):
        typer.echo(f"  {kind:8s} {paths[kind]}")


@sam_app.command(
    "auto",
    epilog=(
        "Example:\n\n  linmix sam auto photo.jpg --points-per-side 16 --out masks/\n\n"
        "Writes OUT/STEM.masks.json (Segment Anything's records: segmentation as COCO RLE, bbox XYWH, area, "
        "predicted_iou, stability_score, point_coords, crop_box) and OUT/STEM.overlay.png."
    ),
)
def auto_command(
    image: Path = typer.Argument(..., help="Image file (PNG, JPEG, WebP, ...)."),
    out: Path = typer.Option(Path("segment-out"), "--out", help="Folder for the masks JSON and the overlay."),
    points_per_side: int = typer.Option(16, "--points-per-side", min=1, help="Grid of single-point prompts per side (SAM uses 32)."),
    points_per_batch: int = typer.Option(64, "--points-per-batch", min=1, help="Prompts decoded together."),
    pred_iou_thresh: Optional[float] = typer.Option(
        None, "--pred-iou-thresh",
        help="Keep masks whose predicted IoU is above this; default: the model's stored value (CHECKPOINT_STEM.auto_masks.json beside the weights), else SAM's 0.88.",
    ),
    stability_score_thresh: Optional[float] = typer.Option(
        None, "--stability-thresh",
        help="Keep masks whose stability score is at least this; default: the model's stored value, else SAM's 0.95.",
    ),
    min_mask_region_area: int = typer.Option(0, "--min-region-area", min=0, help="Remove islands and holes smaller than this many pixels."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    variant: Optional[str] = typer.Option(None, "--variant", help=VARIANT_HELP),
) -> None:
    """Every mask in IMAGE without prompts (Segment Anything's automatic mask generator)."""
    from linmix.sam.auto_defaults import automatic_mask_defaults_for
    from linmix.segment import automatic_masks, read_image, write_automatic_masks

    pixels = read_image(image)
    model = _load(checkpoint, variant)
    # Thresholds calibrated for this model (stored with its weights) unless the user gave them.
    defaults = automatic_mask_defaults_for(model, checkpoint)
    if pred_iou_thresh is None:
        pred_iou_thresh = defaults["pred_iou_thresh"]
    if stability_score_thresh is None:
        stability_score_thresh = defaults["stability_score_thresh"]
    records = automatic_masks(
        model, pixels,
        points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh, min_mask_region_area=min_mask_region_area,
    )
    paths = write_automatic_masks(records, pixels, out, stem=image.stem)
    typer.echo(f"{len(records)} mask(s)")
    for kind, path in paths.items():
        typer.echo(f"  {kind:8s} {path}")


@sam_app.command(
    "export-onnx",
    epilog=(
        "Example:\n\n  linmix sam export-onnx --out onnx/ --return-single-mask\n\n"
        "Writes OUT/encoder.onnx (image [1,3,S,S] normalised and padded -> image_embeddings, stage1_features, "
        "stage2_features), OUT/decoder.onnx (Segment Anything's ONNX decoder: image_embeddings, point_coords, "
        "point_labels, mask_input, has_mask_input, orig_im_size, plus stage1_features / stage2_features -> masks at "
        "the original size, iou_predictions, low_res_masks) and OUT/export.json (the options and the graphs' "
        "input and output names). Needs the export extra."
    ),
)
def export_onnx_command(
    out: Path = typer.Option(Path("onnx"), "--out", help="Folder for encoder.onnx, decoder.onnx and export.json."),
    encoder: bool = typer.Option(True, "--encoder/--no-encoder", help="Also export the image encoder (the slow part)."),
    return_single_mask: bool = typer.Option(
        False, "--return-single-mask",
        help="Decoder returns only the best mask (SAM's rule: the single-mask output for more than two points, "
        "else the best of the three multimask outputs) instead of all four.",
    ),
    use_stability_score: bool = typer.Option(
        False, "--use-stability-score",
        help="Report the stability score of the low-res logits (offset 1.0) instead of the predicted IoU.",
    ),
    return_extra_metrics: bool = typer.Option(
        False, "--return-extra-metrics",
        help="Decoder returns masks, iou_predictions, stability_scores, areas, low_res_masks.",
    ),
    gelu_approximate: bool = typer.Option(
        False, "--gelu-approximate", help="Tanh-approximated GELUs in the decoder (for runtimes without a fast Erf)."
    ),
    opset: Optional[int] = typer.Option(None, "--opset", min=17, help="ONNX opset (default: the exporter's, 20 with torch 2.13; SAM used 17)."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Run onnxscript's graph optimizer (slower export, smaller graph)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    variant: Optional[str] = typer.Option(None, "--variant", help=VARIANT_HELP),
) -> None:
    """Export the prompt decoder (and the image encoder) of an RWKV-SAM model to ONNX, in Segment Anything's convention."""
    model = _load(checkpoint, variant)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise CliError("ONNX export needs the export extra: pip install 'linmix[export]'") from error
    from linmix.sam import export_decoder_onnx, export_image_encoder_onnx
    from linmix.sam.export import ENCODER_INPUT_NAMES, ENCODER_OUTPUT_NAMES, decoder_input_names, decoder_output_names

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if encoder:
        typer.echo(f"exporting the image encoder at {model.image_size}x{model.image_size} (minutes on a CPU) ...")
        written["encoder"] = export_image_encoder_onnx(
            model, out / "encoder.onnx", image_size=model.image_size, opset=opset, optimize=optimize
        )
    written["decoder"] = export_decoder_onnx(
        model, out / "decoder.onnx", return_single_mask=return_single_mask, use_stability_score=use_stability_score,
        return_extra_metrics=return_extra_metrics, gelu_approximate=gelu_approximate, opset=opset, optimize=optimize,
    )
    hq_fusion = bool(getattr(model.mask_decoder, "hq_fusion", False))
    record = {
        "image_size": model.image_size,
        "mask_threshold": model.mask_threshold,
        "return_single_mask": return_single_mask,
        "use_stability_score": use_stability_score,
        "return_extra_metrics": return_extra_metrics,
        "gelu_approximate": gelu_approximate,
        "opset": opset,
        "files": {kind: Path(path).name for kind, path in written.items()},
        "decoder_inputs": list(decoder_input_names(hq_fusion)),
        "decoder_outputs": list(decoder_output_names(return_extra_metrics)),
    }
    if encoder:
        record["encoder_inputs"] = list(ENCODER_INPUT_NAMES)
        record["encoder_outputs"] = list(ENCODER_OUTPUT_NAMES)
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    for kind, path in written.items():
        typer.echo(f"  {kind:8s} {path}")

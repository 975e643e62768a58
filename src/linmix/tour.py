"""``linmix tour``: the main job behind ``make demo``: three short demonstrations, pictures written.

1. **mqar**: the MQAR recall study's ``quick`` preset (:func:`linmix.mqar.run_preset`) and its report
   with the accuracy-vs-state-size frontier plot (:func:`linmix.mqar.write_report`);
2. **segment**: the shipped RWKV-SAM model (:func:`linmix.sam.load_default`) on the bundled example
   images, from box and point prompts; overlay PNGs, the IoU of each mask against the drawn truth,
   and one overview picture. Then the automatic mask generator (no prompts: a 16x16 grid of points,
   the model's stored thresholds, :func:`linmix.sam.auto_defaults.automatic_mask_defaults_for`) on
   each image: ``segment/<image>.auto.png`` (every mask in its own colour), the number of masks per
   image and, per true object, the best IoU of any automatic mask (``segment/auto.json``);
3. **decode**: decode throughput of BASED vs the KV-cache Transformer++ at growing context
   (:mod:`linmix.bench.decode`), a table and a plot.

Every stage runs even when an earlier one failed; :func:`run_tour` returns one
:class:`StageResult` per stage and writes ``summary.json`` beside the pictures. Budget on 2 free
CPU cores: MQAR quick < 5 min, segmentation < 1 min, decode < 2 min.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from linmix.bench.decode import DecodeBenchConfig

__all__ = ["STAGES", "StageResult", "TourConfig", "best_iou", "distinct_colors", "run_tour", "tour_decode_config"]

STAGES = ("mqar", "segment", "decode")


def tour_decode_config() -> DecodeBenchConfig:
    """The tour's decode sweep: 4 layers, batch 4, prompts of 512 / 2048 / 8192 tokens, up to 32 decode
    steps (3 s) per run: about a minute on 2 cores, enough for the KV cache's growth to show."""
    return DecodeBenchConfig(contexts=(512, 2048, 8192), batch=4, n_layer=4, new_tokens=32, repeats=1, max_seconds_per_run=3.0)


@dataclass
class TourConfig:
    """What the tour runs and where it writes.

    out_dir: everything goes under it (mqar/, segment/, decode/, summary.json).
    stages: a subset of :data:`STAGES`, run in that order.
    mqar_preset: the MQAR preset name (``quick``).
    sam_checkpoint / sam_variant: an RWKV-SAM safetensors file instead of the shipped model.
    decode: the decode sweep (:func:`tour_decode_config`).
    threads: torch CPU threads while the tour runs (restored after). One by default: the models are
        small, and on a busy machine two OpenMP threads made image encoding 4x and decode steps about
        10x slower (docs/tour.md); the MQAR sweep uses one thread per worker process by itself.
    progress: progress bars on long work.
    """

    out_dir: Path = Path("tour-out")
    stages: tuple[str, ...] = STAGES
    mqar_preset: str = "quick"
    sam_checkpoint: Path | None = None
    sam_variant: str | None = None
    decode: DecodeBenchConfig = field(default_factory=tour_decode_config)
    threads: int | None = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.threads is not None and (isinstance(self.threads, bool) or int(self.threads) < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages must be among {', '.join(STAGES)}, got {', '.join(self.stages) or 'none'}")


@dataclass
class StageResult:
    """One stage's outcome: ``status`` "ok" or "failed" (``error`` says why), its wall time, the files
    it wrote by kind, and short lines for the summary."""

    name: str
    title: str
    status: str = "ok"
    seconds: float = 0.0
    paths: dict[str, Path] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status, "seconds": round(self.seconds, 2),
                "paths": {k: str(v) for k, v in self.paths.items()}, "lines": self.lines, "error": self.error}


# -------------------------------------------------------------------------------------------------
# stages


def _stage_mqar(config: TourConfig, result: StageResult, echo: Callable[[str], None]) -> None:
    try:
        from linmix.mqar import run_preset, write_report
    except ImportError as error:
        raise RuntimeError(f"the MQAR study is not available in this install ({error})") from error
    out = config.out_dir / "mqar"
    echo(f"MQAR: training the {config.mqar_preset!r} preset's models into {out} (resumes if interrupted)")
    rows = run_preset(config.mqar_preset, out, resume=True, progress=config.progress)
    report = write_report(out)
    result.paths.update({str(k): Path(v) for k, v in dict(report).items()})
    for row in rows:  # linmix.mqar's result rows: one per model, at its best learning rate
        result.lines.append(f"{row['model']}, accuracy {row['mean_accuracy']:.3f}, state {row['state_bytes'] / 1024:.0f} KiB")


def _stage_segment(config: TourConfig, result: StageResult, echo: Callable[[str], None]) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from linmix.data.examples import EXAMPLES, load_example_image, render_example
    from linmix.sam import RwkvSamPredictor
    from linmix.segment import load_sam_model, segment, write_segmentation
    from linmix.visualize import save_png

    out = config.out_dir / "segment"
    model = load_sam_model(config.sam_checkpoint, config.sam_variant)
    echo(f"segment: RWKV-SAM {getattr(model, 'variant', '')} at {model.image_size}px on {len(EXAMPLES)} bundled images -> {out}")
    predictor = RwkvSamPredictor(model)
    records, tiles = [], []
    for example in tqdm(EXAMPLES, desc="segment", unit="image", disable=not config.progress):
        image = load_example_image(example.name)
        truth = render_example(example.name)[1]
        start = time.perf_counter()
        predictor.set_image(image)
        encode_s = time.perf_counter() - start
        for prompt in example.prompts:
            start = time.perf_counter()
            prediction = segment(
                predictor,
                points=list(prompt.points) or None,
                labels=list(prompt.labels) or None,
                box=prompt.box,
            )
            decode_s = time.perf_counter() - start
            target = truth[prompt.target]
            mask = prediction.best_mask
            union = np.logical_or(mask, target).sum()
            iou = float(np.logical_and(mask, target).sum() / union) if union else 1.0
            prediction.extra.update({"example": example.name, "prompt": prompt.name, "target": prompt.target,
                                     "iou_vs_truth": round(iou, 4), "encode_s": round(encode_s, 3), "decode_s": round(decode_s, 4)})
            stem = f"{example.name}.{prompt.name.replace('+', '_')}"
            paths = write_segmentation(prediction, image, out, stem=stem)
            result.paths[f"{stem}.overlay"] = paths["overlay"]
            records.append(prediction.summary())
            tiles.append((paths["overlay"], f"{example.name}, {prompt.name} -> {prompt.target}: IoU {iou:.2f} vs truth"))
            result.lines.append(f"{example.name:14s} {prompt.name:17s} -> {prompt.target:8s} IoU vs truth {iou:.3f} "
                                f"(predicted {float(prediction.scores[prediction.best]):.3f})")
        result.lines.append(f"{'':14s} encoded in {encode_s:.2f} s")
    result.paths["overview"] = save_png(_contact_sheet(tiles), out / "overview.png")
    summary = out / "segment.json"
    summary.write_text(json.dumps(records, indent=2) + "\n")
    result.paths["scores"] = summary
    mean_iou = sum(r["iou_vs_truth"] for r in records) / len(records)
    result.lines.insert(0, f"mean IoU vs the drawn truth over {len(records)} prompts: {mean_iou:.3f}")
    _segment_automatic(config, model, out, result, echo)


TOUR_AUTO_POINTS_PER_SIDE = 16


def _segment_automatic(config: TourConfig, model: Any, out: Path, result: StageResult, echo: Callable[[str], None]) -> None:
    """The automatic mask generator on each bundled example: an overlay of all its masks, their count,
    and per true object the best IoU of any automatic mask (0 when there is none)."""
    import numpy as np
    from tqdm.auto import tqdm

    from linmix.data.examples import EXAMPLES, load_example_image, render_example
    from linmix.sam import AutomaticMaskGenerator
    from linmix.sam.auto_defaults import automatic_mask_defaults_for
    from linmix.visualize import overlay_masks, save_png

    # The thresholds calibrated for this model (stored beside its weights), as `linmix sam auto` uses.
    thresholds = automatic_mask_defaults_for(model, config.sam_checkpoint)
    generator = AutomaticMaskGenerator(model, points_per_side=TOUR_AUTO_POINTS_PER_SIDE, output_mode="binary_mask", **thresholds)
    echo(f"segment: automatic masks ({TOUR_AUTO_POINTS_PER_SIDE}x{TOUR_AUTO_POINTS_PER_SIDE} points, predicted IoU > "
         f"{thresholds['pred_iou_thresh']:.2f}, stability >= {thresholds['stability_score_thresh']:.2f})")
    records = []
    for example in tqdm(EXAMPLES, desc="automatic masks", unit="image", disable=not config.progress):
        image = load_example_image(example.name)
        truth = render_example(example.name)[1]
        start = time.perf_counter()
        generated = generator.generate(image)
        seconds = time.perf_counter() - start
        # Largest first, so small masks stay visible on top.
        generated.sort(key=lambda record: -record["area"])
        masks = np.stack([r["segmentation"] for r in generated]) if generated else np.zeros((0, *image.shape[:2]), dtype=bool)
        path = save_png(overlay_masks(image, masks, colors=distinct_colors(len(masks)), alpha=0.45), out / f"{example.name}.auto.png")
        result.paths[f"{example.name}.auto.overlay"] = path
        best = {name: round(best_iou(target, masks), 4) for name, target in truth.items()}
        records.append({"example": example.name, "masks": len(masks), "best_iou": best, "seconds": round(seconds, 3),
                        "overlay": str(path)})
        cells = ", ".join(f"{name} {iou:.2f}" for name, iou in best.items())
        result.lines.append(f"{example.name:14s} automatic: {len(masks):3d} masks in {seconds:.2f} s; best IoU per object: {cells}")
    auto_summary = out / "auto.json"
    auto_summary.write_text(json.dumps({"points_per_side": TOUR_AUTO_POINTS_PER_SIDE, **thresholds, "images": records}, indent=2) + "\n")
    result.paths["auto"] = auto_summary


def best_iou(target: Any, masks: Any) -> float:
    """The highest IoU between the HxW bool ``target`` and any of the NxHxW bool ``masks`` (0 for none)."""
    import numpy as np

    if len(masks) == 0:
        return 0.0
    target = np.asarray(target, dtype=bool)
    stack = np.asarray(masks, dtype=bool)
    intersection = np.logical_and(stack, target).sum(axis=(1, 2))
    union = np.logical_or(stack, target).sum(axis=(1, 2))
    ious = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return float(ious.max())


def distinct_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` RGB colours: :data:`linmix.visualize.MASK_COLORS` first, then hues a golden angle apart,
    so that many automatic masks still each get their own colour."""
    import colorsys

    from linmix.visualize import MASK_COLORS

    colors = list(MASK_COLORS[:count])
    for index in range(count - len(colors)):
        hue = (0.11 + index * 0.381966) % 1.0
        value = 0.95 if index % 2 else 0.75
        colors.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, value)))
    return colors or [MASK_COLORS[0]]


def _contact_sheet(tiles: list[tuple[Path, str]], columns: int = 2, tile_width: int = 384) -> Any:
    """The overlays side by side with a caption under each: an HxWx3 uint8 array."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType: a readable size
    except TypeError:
        font = ImageFont.load_default()
    images = []
    for path, caption in tiles:
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            scale = tile_width / picture.width
            picture = picture.resize((tile_width, max(1, round(picture.height * scale))), Image.Resampling.LANCZOS)
        captioned = Image.new("RGB", (tile_width, picture.height + 22), "white")
        captioned.paste(picture, (0, 0))
        ImageDraw.Draw(captioned).text((6, picture.height + 4), caption, fill=(20, 20, 20), font=font)
        images.append(captioned)
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    heights = [max(im.height for im in row) for row in rows]
    sheet = Image.new("RGB", (columns * tile_width + (columns + 1) * 6, sum(heights) + (len(rows) + 1) * 6), (235, 235, 235))
    y = 6
    for row, height in zip(rows, heights):
        for index, image in enumerate(row):
            sheet.paste(image, (6 + index * (tile_width + 6), y))
        y += height + 6
    return np.asarray(sheet)


def _stage_decode(config: TourConfig, result: StageResult, echo: Callable[[str], None]) -> None:
    from linmix.bench.decode import measure_decode_throughput, write_decode_report

    out = config.out_dir / "decode"
    decode = config.decode
    echo(f"decode: BASED vs Transformer++ ({decode.n_layer} layers, d_model {decode.d_model}, batch {decode.batch}) "
         f"at prompts of {', '.join(map(str, decode.contexts))} tokens -> {out}")
    rows = measure_decode_throughput(decode, progress=config.progress)
    result.paths.update(write_decode_report(rows, out, decode))
    by = {(r.model, r.context): r for r in rows}
    for context in decode.contexts:
        cells = [f"{name} {by[name, context].tokens_per_s:6.0f} tok/s (state {by[name, context].state_bytes / 2**20:6.2f} MiB)"
                 for name in decode.models if (name, context) in by]
        result.lines.append(f"T={context:<6d} " + "   ".join(cells))


_STAGE_FUNCTIONS = {
    "mqar": ("MQAR recall vs state size (quick preset)", _stage_mqar),
    "segment": ("RWKV-SAM on the bundled examples", _stage_segment),
    "decode": ("decode throughput at growing context", _stage_decode),
}


def run_tour(config: TourConfig | None = None, *, echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run the stages of ``config`` in order; a failing stage is recorded and the next one runs.
    Writes ``out_dir/summary.json``; returns one :class:`StageResult` per stage."""
    import torch

    config = config or TourConfig()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    try:
        results = [_run_stage(name, config, echo) for name in config.stages]
    finally:
        torch.set_num_threads(previous_threads)
    summary = config.out_dir / "summary.json"
    summary.write_text(json.dumps({"out_dir": str(config.out_dir), "stages": [r.to_dict() for r in results]}, indent=2) + "\n")
    return results


def _run_stage(name: str, config: TourConfig, echo: Callable[[str], None]) -> StageResult:
    """One stage; an exception is recorded in the result (traceback in out_dir/NAME.error.txt)."""
    title, function = _STAGE_FUNCTIONS[name]
    result = StageResult(name, title)
    echo(f"\n== {name}: {title}")
    start = time.perf_counter()
    try:
        function(config, result, echo)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one stage failing must not hide the others
        result.status = "failed"
        result.error = f"{type(error).__name__}: {error}".splitlines()[0]
        (config.out_dir / f"{name}.error.txt").write_text(traceback.format_exc())
        echo(f"{name} failed: {result.error} (traceback in {config.out_dir / f'{name}.error.txt'})")
    result.seconds = time.perf_counter() - start
    return result


def format_summary(results: list[StageResult], out_dir: str | PathLike[str]) -> str:
    """The closing text of the tour: per stage its status, time, findings and the main files."""
    lines = ["", "linmix tour: summary", "=" * 20]
    for result in results:
        mark = "ok" if result.status == "ok" else "FAILED"
        lines.append(f"[{mark}] {result.name}: {result.title} ({result.seconds:.0f} s)")
        if result.error:
            lines.append(f"    error: {result.error}")
        lines += [f"    {line}" for line in result.lines]
        main = {k: v for k, v in result.paths.items() if not k.endswith(".overlay")}
        for kind, path in main.items():
            lines.append(f"    {kind:10s} {path}")
    lines.append(f"everything is under {out_dir} (summary.json lists every file)")
    return "\n".join(lines)

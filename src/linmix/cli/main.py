"""Top-level commands: `linmix tour`, `linmix serve`, `linmix bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from linmix.cli.app import CliError, app


def _split_csv(text: Optional[str], what: str) -> list[str]:
    if text is None:
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CliError(f"{what} must list at least one item, comma-separated")
    return items


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in _split_csv(text, what))
    except ValueError:
        raise CliError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if min(values) < 1:
        raise CliError(f"{what} must be positive, got {text!r}")
    return values


@app.command(
    "tour",
    epilog=(
        "Examples:\n\n  linmix tour                      (all three stages, into tour-out/)\n\n"
        "  linmix tour --only segment,decode --out /tmp/tour\n\n"
        "Stages: mqar (MQAR quick preset, frontier plot), segment (RWKV-SAM on the bundled images: overlay "
        "PNGs), decode (BASED vs KV-cache Transformer++ decode throughput plot). Exit status 1 when a stage failed."
    ),
)
def tour_command(
    out: Path = typer.Option(Path("tour-out"), "--out", help="Folder for everything the tour writes."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only these stages, comma-separated (mqar, segment, decode)."),
    skip: Optional[str] = typer.Option(None, "--skip", help="Skip these stages, comma-separated."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="RWKV-SAM safetensors file instead of the shipped model."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1: the small models gain little from more, and lose much on a busy machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on long work."),
) -> None:
    """A ten-minute tour on a CPU: MQAR recall study, RWKV-SAM on example images, decode throughput."""
    from linmix.tour import STAGES, TourConfig, format_summary, run_tour

    stages = _split_csv(only, "--only") if only is not None else list(STAGES)
    skipped = _split_csv(skip, "--skip") if skip is not None else []
    unknown = [s for s in stages + skipped if s not in STAGES]
    if unknown:
        raise CliError(f"unknown stage(s) {', '.join(unknown)}: the stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages and s not in skipped]
    if not stages:
        raise CliError("no stage left to run (check --only and --skip)")
    config = TourConfig(out_dir=out, stages=tuple(stages), sam_checkpoint=checkpoint, threads=threads, progress=progress)
    results = run_tour(config, echo=typer.echo)
    typer.echo(format_summary(results, out))
    if any(r.status != "ok" for r in results):
        raise typer.Exit(1)


@app.command(
    "serve",
    epilog=(
        "Example:\n\n  linmix serve --port 8000      then open http://127.0.0.1:8000\n\n"
        "The page: click = foreground point, right-click or Shift+click = background point, drag = box. "
        "JSON API at /docs (POST /api/images with multipart field `file`, then POST /api/images/{id}/predict). "
        "Needs the serve extra."
    ),
)
def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="RWKV-SAM safetensors file instead of the shipped model."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Backbone variant of --checkpoint when its metadata does not say."),
    cache_size: int = typer.Option(16, "--cache-size", min=1, help="Image embeddings kept in memory (least recently used dropped)."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="Largest upload, in MiB."),
    max_side: int = typer.Option(4096, "--max-side", min=16, help="Largest image side, in pixels."),
    max_concurrency: int = typer.Option(2, "--max-concurrency", min=1, help="Model calls at once (others wait, then 503)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads per model call (default: torch's)."),
) -> None:
    """Serve the click-to-segment web page and its JSON API."""
    try:
        import uvicorn

        from linmix.serve import ServeLimits, create_app
    except ImportError as error:
        raise CliError(f"the web demo needs the serve extra: pip install 'linmix[serve]' ({error.name} is missing)") from error
    from linmix.segment import load_sam_model

    limits = ServeLimits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_side=max_side, max_pixels=max_side * max_side,
        cache_size=cache_size, max_concurrent_model_calls=max_concurrency,
    )
    model = load_sam_model(checkpoint, variant)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    typer.echo(f"RWKV-SAM {getattr(model, 'variant', '')} ({model.image_size}px input) on http://{host}:{port}  (API docs: /docs)")
    uvicorn.run(create_app(model, limits=limits), host=host, port=port, log_level="info")


@app.command(
    "bench",
    epilog=(
        "Examples:\n\n  linmix bench                                   (prompts 256..8192, batch 1)\n\n"
        "  linmix bench --contexts 512,2048,8192 --batch 16 --out bench-out\n\n"
        "Writes OUT/decode.json, OUT/decode.md (the table) and OUT/decode.png (the plot). Random weights; "
        "tokens/s count decode steps only (prefill excluded)."
    ),
)
def bench_command(
    contexts: str = typer.Option("256,1024,4096,8192", "--contexts", help="Prompt lengths, comma-separated."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
    layers: int = typer.Option(8, "--layers", min=1, help="Layers of both models."),
    d_model: int = typer.Option(256, "--d-model", min=64, help="Model width (a multiple of 64)."),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Decode steps per run."),
    max_seconds: float = typer.Option(4.0, "--max-seconds", min=0.1, help="Stop a run after this long and rate the steps done."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Runs per point; the fastest is kept."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for the JSON, table and plot."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Decode throughput and state size at growing context: BASED (recurrent) vs Transformer++ (KV cache)."""
    from linmix.bench.decode import DecodeBenchConfig, measure_decode_throughput, write_decode_report

    config = DecodeBenchConfig(
        contexts=_parse_ints(contexts, "--contexts"), batch=batch, n_layer=layers, d_model=d_model, new_tokens=new_tokens,
        max_seconds_per_run=max_seconds, repeats=repeats, threads=threads,
    )
    rows = measure_decode_throughput(config, progress=progress)
    paths = write_decode_report(rows, out, config)
    typer.echo(paths["table"].read_text().rstrip())
    for kind, path in paths.items():
        typer.echo(f"  {kind:6s} {path}")

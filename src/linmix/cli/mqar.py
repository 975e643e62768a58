"""`linmix mqar ...`: run the MQAR recall-vs-state-size sweep and write its report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from linmix.cli.app import CliError, mqar_app


@mqar_app.command("run")
def run(
    out: Path = typer.Option(..., "--out", help="Output directory (results.jsonl, runs.jsonl, results.md, pareto.png)."),
    preset: str = typer.Option("quick", "--preset", help="quick (< 5 min on 2 cores), cpu (the reduced study), paper (the full protocol, a GPU run)."),
    models: Optional[list[str]] = typer.Option(None, "--models", help="Only these models (names such as based_d64_f16, or mixers such as mamba); repeat or comma-separate."),
    restart: bool = typer.Option(False, "--restart", help="Discard finished runs in OUT instead of resuming."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ..."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch per worker (1 is fastest for these tiny models)."),
    workers: int = typer.Option(0, "--workers", help="Processes training models in parallel; 0 = auto (up to 2 on CPU, 1 on CUDA)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train and evaluate every model of a preset (resumable), then write the table and the Pareto plot."""
    from linmix.mqar import run_preset, write_report

    names = [name for item in (models or []) for name in item.split(",") if name]
    if threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    if workers < 0:
        raise CliError(f"--workers must be >= 0 (0 = auto), got {workers}")
    rows = run_preset(preset, out, resume=not restart, progress=progress, models=names or None, device=device,
                      threads=threads, workers=workers or None)
    paths = write_report(out)
    typer.echo(f"{len(rows)} models; table {paths['table']}, plot {paths['plot']}")


@mqar_app.command("report")
def report(out: Path = typer.Argument(..., help="A directory written by `linmix mqar run`.")) -> None:
    """(Re)write results.md and pareto.png from OUT/results.jsonl and print the table."""
    from linmix.mqar import write_report

    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory written by `linmix mqar run`")
    paths = write_report(out)
    typer.echo(Path(paths["table"]).read_text())
    typer.echo(f"plot: {paths['plot']}")

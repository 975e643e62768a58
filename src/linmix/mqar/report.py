"""The report of a sweep: a markdown table (results.md), a Pareto plot (pareto.png) and the
training curves (curves.png: test accuracy after each epoch, one panel per model, one line per
learning rate).

Reads ``out_dir/results.jsonl`` (the last row per model wins: a resumed sweep may append newer ones)
and, for the curves, ``out_dir/runs.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_curves", "load_results", "pareto_frontier", "results_table", "write_report"]

# One colour and marker per mixer, stable across reports.
_STYLE = {
    "attention": ("tab:red", "s", "Attention"),
    "based": ("tab:blue", "o", "BASED"),
    "based_window": ("tab:cyan", "D", "BASED + sliding window"),
    "sliding_window": ("tab:orange", "v", "Sliding window"),
    "mamba": ("tab:green", "^", "Mamba"),
    "rwkv": ("tab:purple", "P", "RWKV-4"),
    "rwkv5": ("tab:pink", "*", "RWKV-5 (matrix state)"),
    "base_conv": ("tab:brown", "X", "BaseConv (long conv)"),
}


def load_results(out_dir) -> list[dict]:
    """The result rows of ``out_dir/results.jsonl``, one per model (the latest), in file order."""
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no results.jsonl in {out_dir}: run `linmix mqar run --out {out_dir}` first")
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill mid-write
            rows.pop(row["model"], None)
            rows[row["model"]] = row
    if not rows:
        raise ValueError(f"{path} holds no finished models yet")
    return list(rows.values())


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (state bytes, accuracy) that no other point beats with less or equal state; sorted by state."""
    frontier: list[tuple[float, float]] = []
    for state, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((state, accuracy))
    return frontier


def _kilobytes(n: int) -> str:
    return f"{n / 1000:,.1f}"


def results_table(rows: list[dict]) -> str:
    """A markdown table: one row per model, sorted by mixer then state size."""
    segments = list(rows[0]["accuracy"])
    header = ["model", "state (KB)", "params", *segments, "mean", "in-training lengths", "best lr", "epochs", "steps",
              "gain, last 1/4", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = list(_STYLE)
    for row in sorted(rows, key=lambda r: (order.index(r["mixer"]) if r["mixer"] in order else len(order), r["state_bytes"], r["model"])):
        cells = [
            f"`{row['model']}`",
            _kilobytes(row["state_bytes"]),
            f"{row['parameters']:,}",
            *(f"{row['accuracy'].get(s, float('nan')):.3f}" for s in segments),
            f"**{row['mean_accuracy']:.3f}**",
            f"{row.get('in_training_lengths_accuracy', float('nan')):.3f}",
            f"{row['best_lr']:g}",
            str(row["epochs"]),
            str(row.get("steps") or "-"),
            "-" if row.get("curve_gain_last_quarter") is None else f"{row['curve_gain_last_quarter']:+.3f}",
            f"{row['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pairs_and_length(segment_name: str) -> tuple[int, int]:
    """``"L256_N64"`` -> (64, 256): the segment with the most key-value pairs is the hardest."""
    length, pairs = segment_name.split("_")
    return int(pairs[1:]), int(length[1:])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments = list(rows[0]["accuracy"])
    hardest = max(segments, key=_pairs_and_length)
    panels = [("mean accuracy over test segments", lambda r: r["mean_accuracy"]),
              (f"accuracy on {hardest}", lambda r: r["accuracy"][hardest])]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    for axis, (title, accuracy_of) in zip(axes, panels):
        points = [(row["state_bytes"], accuracy_of(row)) for row in rows]
        frontier = pareto_frontier(points)
        axis.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="0.6", lw=1, zorder=1, label="Pareto frontier")
        for mixer, (colour, marker, label) in _STYLE.items():
            mine = [row for row in rows if row["mixer"] == mixer]
            if mine:
                axis.scatter([r["state_bytes"] for r in mine], [accuracy_of(r) for r in mine], c=colour, marker=marker,
                             s=42, label=label, zorder=2, edgecolors="black", linewidths=0.4)
        axis.set_xscale("log")
        axis.set_xlabel(f"recurrent state (bytes, at L = {rows[0]['state_bytes_at']})")
        axis.set_ylabel("accuracy")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(f"MQAR: recall vs state size (preset {rows[0]['preset']!r})")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def load_curves(out_dir) -> dict[str, dict[float, list[dict]]]:
    """``{model: {lr: curve}}`` from ``out_dir/runs.jsonl`` (the last run per (model, lr) wins);
    runs recorded before curves existed are left out."""
    path = Path(out_dir) / "runs.jsonl"
    curves: dict[str, dict[float, list[dict]]] = {}
    if not path.exists():
        return curves
    for line in path.read_text().splitlines():
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill mid-write
        if isinstance(run, dict) and run.get("curve"):
            curves.setdefault(run["model"], {})[float(run["lr"])] = run["curve"]
    return curves


def _plot_curves(rows: list[dict], curves: dict[str, dict[float, list[dict]]], path: Path) -> bool:
    """One panel per model: mean test accuracy against training steps, a line per learning rate
    (the best one thick). Returns False (and writes nothing) when no run has a curve."""
    order = list(_STYLE)
    models = sorted((row for row in rows if curves.get(row["model"])),
                    key=lambda r: (order.index(r["mixer"]) if r["mixer"] in order else len(order), r["state_bytes"], r["model"]))
    if not models:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(models))
    lines = -(-len(models) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.5 * lines), dpi=90, squeeze=False, sharey=True)
    all_lrs = sorted({lr for row in models for lr in curves[row["model"]]})
    shades = {lr: plt.cm.plasma(0.8 * i / max(1, len(all_lrs) - 1)) for i, lr in enumerate(all_lrs)}  # no pale yellow
    for axis, row in zip(axes.flat, models):
        for lr, curve in sorted(curves[row["model"]].items()):
            best = lr == float(row["best_lr"])
            axis.plot([p["step"] for p in curve], [p["mean_accuracy"] for p in curve], color=shades[lr],
                      lw=2.2 if best else 1.0, marker="o" if best else None, ms=2.5, label=f"lr {lr:g}" + (" (best)" if best else ""))
        colour = _STYLE.get(row["mixer"], ("black",))[0]
        axis.set_title(row["model"], fontsize=9, color=colour)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(True, alpha=0.25)
        axis.legend(fontsize=6, loc="upper left")
    for axis in axes.flat[len(models):]:
        axis.axis("off")
    for axis in axes[:, 0]:
        axis.set_ylabel("mean test accuracy")
    for axis in axes[-1, :]:
        axis.set_xlabel("training steps")
    figure.suptitle(f"MQAR training curves (preset {rows[0]['preset']!r}): test accuracy after each epoch")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def write_report(out_dir) -> dict:
    """Write ``results.md`` (table) and ``pareto.png`` (accuracy vs state bytes, log x) into ``out_dir``.

    and ``curves.png`` (test accuracy after each epoch, per model and learning rate) when the runs
    recorded curves. Returns ``{"table": path, "plot": path}`` plus ``"curves": path`` when written.
    """
    out = Path(out_dir)
    rows = load_results(out)
    table_path, plot_path = out / "results.md", out / "pareto.png"
    preset = rows[0]["preset"]
    lines = [
        f"# MQAR results (preset `{preset}`)\n",
        "Accuracy per test segment (`L{length}_N{key-value pairs}`): per example the fraction of queries "
        "answered right, averaged over examples; mean over the test segments, and over those whose length "
        "was seen in training; best learning rate per model. State: bytes of recurrent state at "
        f"L = {rows[0]['state_bytes_at']} (fp32, both layers); KB = 1000 bytes. \"gain, last 1/4\": how much "
        "the mean test accuracy rose over the last quarter of the best run's epochs (near 0: the curve had "
        "flattened; see curves.png).\n",
        results_table(rows),
    ]
    table_path.write_text("\n".join(lines))
    _plot(rows, plot_path)
    paths = {"table": str(table_path), "plot": str(plot_path)}
    curves_path = out / "curves.png"
    if _plot_curves(rows, load_curves(out), curves_path):
        paths["curves"] = str(curves_path)
    return paths

#!/usr/bin/env python
"""Compare trained LMs (BASED, Mamba, Transformer++, sliding window...) on the recall-intensive corpus.

Each ``--run NAME=RUN_DIR`` is a `linmix lm train` output folder holding

    model/                  config.json (+ model.safetensors): parameters and recurrent state size
    metrics.jsonl           the training log (step, loss, lr, tokens_per_s; eval_* records)
    lm_train_config.json    batch_size x seq_len = tokens per optimizer step (for tokens trained)
    eval.json               `linmix lm eval RUN/model --data data/shakespeare/heldout
                                --recall data/recall/eval/recall_heldout.jsonl --json-out RUN/eval.json`
    eval_recall_ppl.json    `linmix lm eval RUN/model --data data/recall/eval/heldout_docs.jsonl
                                --json-out RUN/eval_recall_ppl.json` (optional)

``--records`` is the prompt file with its metadata (eval/recall_heldout.jsonl of `linmix lm
recall-corpus`); the generations in eval.json are in its record order (a `--limit N` evaluation
covers the first N records). ``--lm-eval NAME=PATH`` adds lm-eval's view of the same records: PATH
is an `lm_eval --output_path` folder written with `--log_samples` (or a samples_*.jsonl file); its
"contains" and whether its generations equal `linmix lm eval`'s, record by record.

Written to ``--out``:

    results.md              the comparison table, then recall by context length, by number of
                            records in the document, by layout and by the answer's distance from
                            where its record states it (when the records carry answer_distance_tokens)
    results.json            every number of the tables, per run
    recall_vs_state.png     overall recall against recurrent state bytes at 2048 tokens (log x)
    recall_vs_length.png    recall by context-length bucket, one line per model
    learning_curves.png     training loss against tokens trained, one line per model
    copy_gain.png           the answer-copy probe's copy gain against tokens trained (when a run has a probe)

The copy probe (benchmarks/lm_copy_probe.py) is read from RUN_DIR/copy_probe.jsonl, or from the files
given with ``--probe NAME=FILE`` (repeatable: a run continued in a second folder has its probe in two
files; rows are merged by step, the later file winning).

Training wall time is the sum of the log windows (tokens in the window / tokens_per_s): the time
between log records, so it includes periodic evaluation and checkpointing.

    python benchmarks/lm_recall_report.py --records data/recall/eval/recall_heldout.jsonl \\
        --run based=runs/based --run mamba=runs/mamba --run transformer-pp=runs/tpp \\
        --run sliding-window=runs/sw --out runs/recall-report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from linmix.lm.evaluate import contains_score
from linmix.lm.recall_corpus import bucket_name, load_recall_eval, recall_breakdown
from linmix.training.metrics import read_metrics

STATE_TOKENS = 2048  # sequence length at which the recurrent state is counted (attention grows with it)
BREAKDOWNS = {"length_bucket": "context length (bytes: the corpus counts byte tokens)", "num_records": "records in the document",
              "layout": "layout", "answer_distance": "distance from where the record states the value to the question (bytes)"}
# Buckets of a record's answer_distance_tokens (bytes from the value's first occurrence to the end of the prompt):
# a model that recalls only what a short window or its local state reaches scores only in the first ones.
DISTANCE_EDGES = (128, 256, 512, 1024, 2048)


def _split_named(value: str, option: str, placeholder: str = "PATH") -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{option} expects NAME={placeholder}, got {value!r}")
    return name, Path(path)


def parse_named(values: list[str], option: str) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` -> ``{NAME: Path}`` in order; names must be unique."""
    named: dict[str, Path] = {}
    for value in values:
        name, path = _split_named(value, option)
        if name in named:
            raise ValueError(f"{option} names {name!r} twice")
        named[name] = path
    return named


def parse_probe_files(values: list[str], runs: dict[str, Path]) -> dict[str, list[Path]]:
    """``--probe NAME=FILE`` (repeatable, also per name) -> files per run; a run without one uses
    RUN_DIR/copy_probe.jsonl when it exists."""
    files: dict[str, list[Path]] = {}
    for value in values:
        name, path = _split_named(value, "--probe", "FILE")
        if name not in runs:
            raise ValueError(f"--probe names {name!r}, which no --run names (runs: {list(runs)})")
        if not path.is_file():
            raise FileNotFoundError(f"--probe {name}: no file {path} (benchmarks/lm_copy_probe.py --out writes it)")
        files.setdefault(name, []).append(path)
    for name, run_dir in runs.items():
        if name not in files and (run_dir / "copy_probe.jsonl").is_file():
            files[name] = [run_dir / "copy_probe.jsonl"]
    return files


def copy_probe_curve(paths: list[Path], tokens_per_step: int | None) -> list[dict]:
    """The probe's rows of one run ordered by step (a step probed twice: the later file's row)."""
    by_step: dict[int, dict] = {}
    for path in paths:
        for row in read_metrics(path):
            if "copy_gain" not in row or "step" not in row:
                raise ValueError(f"{path} is not a copy-probe file (rows need step and copy_gain)")
            by_step[row["step"]] = row
    keys = ("record_continuation", "answer_continuation", "copy_gain", "documents")
    return [{"step": step, "tokens": step * tokens_per_step if tokens_per_step else None,
             **{key: by_step[step][key] for key in keys if key in by_step[step]}} for step in sorted(by_step)]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def model_size(model_dir: Path) -> dict:
    """Parameters and recurrent state bytes (fp32, the BASED paper's accounting) from config.json alone."""
    import torch

    from linmix.lm.config import BasedConfig
    from linmix.lm.model import BasedForCausalLM

    config = BasedConfig.load(model_dir)
    with torch.device("meta"):  # no weights are needed to count
        model = BasedForCausalLM(config)
    mixers: dict[str, int] = {}
    for mixer in config.layer_types:
        mixers[mixer] = mixers.get(mixer, 0) + 1
    return {"parameters": model.num_parameters(), "state_bytes": model.state_size_bytes(STATE_TOKENS),
            "d_model": config.d_model, "n_layer": config.n_layer, "mixers": mixers}


def training_summary(run_dir: Path) -> dict:
    """Tokens trained, wall time and the loss curve from metrics.jsonl (+ lm_train_config.json)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"no training log at {run_dir / 'metrics.jsonl'}")
    lm_config = _read_json(run_dir / "lm_train_config.json")
    tokens_per_step = lm_config["batch_size"] * lm_config["seq_len"] if lm_config else None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    wall, previous_step = 0.0, 0
    for record in train:
        rate = record.get("tokens_per_s")
        if tokens_per_step and rate:
            wall += (record["step"] - previous_step) * tokens_per_step / rate
        previous_step = record["step"]
    steps = train[-1]["step"] if train else 0

    def tokens(step):
        return step * tokens_per_step if tokens_per_step else None

    return {
        "steps": steps, "tokens_per_step": tokens_per_step, "tokens": tokens(steps),
        "wall_s": wall if tokens_per_step else None,
        "final_loss": train[-1]["loss"] if train else None,
        "curve": [{"step": r["step"], "tokens": tokens(r["step"]), "loss": r["loss"]} for r in train],
        "eval_curve": [{"step": r["step"], "tokens": tokens(r["step"]), "loss": r["eval_loss"]} for r in evals],
    }


def _perplexity(result: dict | None) -> dict | None:
    if not result:
        return None
    block = result.get("perplexity", result)  # `linmix lm eval` nests it; `linmix lm train`'s eval.json does not
    if "perplexity" not in block:
        return None
    return {key: block[key] for key in ("perplexity", "loss", "bits_per_byte", "scored_tokens", "data") if key in block}


def recall_generations(eval_result: dict, records_path: Path) -> list[str]:
    """The generations of the records file in eval.json (its recall entry named after the file's stem)."""
    recall = eval_result.get("recall") or {}
    if records_path.stem in recall:
        return recall[records_path.stem]["generations"]
    if len(recall) == 1:
        return next(iter(recall.values()))["generations"]
    raise ValueError(f"eval.json has no recall results for {records_path.stem!r} (has {sorted(recall)})")


def lm_eval_samples(path: Path) -> list[dict]:
    """The logged samples of an `lm_eval --log_samples` output (a folder searched for samples_*.jsonl,
    or the file itself), sorted by doc_id."""
    if path.is_dir():
        files = sorted(path.rglob("samples_*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no samples_*.jsonl under {path} (run lm_eval with --output_path and --log_samples)")
        path = files[-1]  # the newest: lm-eval's names end in the run's date
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row["doc_id"])


def _sample_generation(sample: dict) -> str:
    response = sample["filtered_resps"][0]
    return response[0] if isinstance(response, list) else response


def compare_lm_eval(samples: list[dict], records: list[dict], generations: list[str]) -> dict:
    """lm-eval's contains on its samples and how many of its generations equal `linmix lm eval`'s."""
    equal, scores = 0, []
    for sample in samples:
        index = sample["doc_id"]
        if index >= len(generations):
            raise ValueError(f"lm_eval sample doc_id {index} is beyond the {len(generations)} linmix generations")
        if "doc" in sample and sample["doc"].get("text") not in (None, records[index]["text"]):
            raise ValueError(f"lm_eval sample {index} was run on another prompt than record {index} of the records file")
        generation = _sample_generation(sample)
        gold = sample.get("target", records[index]["value"])
        scores.append(float(sample["contains"]) if "contains" in sample else contains_score(generation, gold))
        equal += generation == generations[index]
    return {"n": len(samples), "contains": sum(scores) / len(scores) if scores else float("nan"),
            "generations_equal": equal}


def summarize_run(name: str, run_dir: Path, records: list[dict], records_path: Path, lm_eval_path: Path | None,
                  probe_files: list[Path] | None = None) -> dict:
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"run {name}: no model/ folder in {run_dir}")
    eval_result = _read_json(run_dir / "eval.json")
    if eval_result is None:
        raise FileNotFoundError(f"run {name}: no eval.json in {run_dir} (linmix lm eval ... --json-out RUN/eval.json)")
    generations = recall_generations(eval_result, records_path)
    if len(generations) > len(records):
        raise ValueError(f"run {name}: {len(generations)} generations but only {len(records)} records in {records_path}")
    scored = records[: len(generations)]  # `linmix lm eval --limit N` scores the first N records
    correct, n = int(sum(contains_score(g, r["value"]) for g, r in zip(generations, scored))), len(scored)
    summary = {
        "run_dir": str(run_dir), **model_size(run_dir / "model"), "train": training_summary(run_dir),
        "shakespeare": _perplexity(eval_result), "recall_corpus": _perplexity(_read_json(run_dir / "eval_recall_ppl.json")),
        "recall": {"contains": correct / n if n else float("nan"), "correct": correct, "n": n},
        **{f"by_{field}": recall_breakdown(scored, generations, by=field) for field in BREAKDOWNS
           if field != "answer_distance" or all(field in record for record in scored)},  # older files lack it
        "generations": generations,
    }
    if lm_eval_path is not None:
        summary["lm_eval"] = compare_lm_eval(lm_eval_samples(lm_eval_path), scored, generations)
    if probe_files:
        summary["copy_probe"] = copy_probe_curve(probe_files, summary["train"]["tokens_per_step"])
    return summary


# ---------------------------------------------------------------------------------- tables
def _group_order(field: str, groups) -> list[str]:
    if field in ("length_bucket", "answer_distance"):
        return sorted(groups, key=lambda g: int(g.split("-")[0]))
    if field == "num_records":
        return sorted(groups, key=int)
    return sorted(groups)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _percent(group: dict | None) -> str:
    if not group:
        return "-"
    return f"{100 * group['contains']:.1f}% ({group['correct']}/{group['n']})"


def _bytes(count: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def main_table(results: dict) -> str:
    with_lm_eval = any("lm_eval" in run for run in results.values())
    header = ["model", "parameters", f"state bytes @ {STATE_TOKENS}", "train tokens", "train wall time",
              "Shakespeare ppl", "Shakespeare bits/byte", "recall-corpus ppl", "recall contains"]
    if with_lm_eval:
        header.append("lm_eval contains (N) / generations equal")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in results.items():
        shakespeare, corpus = run["shakespeare"] or {}, run["recall_corpus"] or {}
        row = [name, f"{run['parameters']:,}", _bytes(run["state_bytes"]), _fmt(run["train"]["tokens"], ","),
               _duration(run["train"]["wall_s"]), _fmt(shakespeare.get("perplexity"), ".3f"),
               _fmt(shakespeare.get("bits_per_byte"), ".4f"), _fmt(corpus.get("perplexity"), ".3f"), _percent(run["recall"])]
        if with_lm_eval:
            lm_eval = run.get("lm_eval")
            row.append(f"{100 * lm_eval['contains']:.1f}% ({lm_eval['n']}) / {lm_eval['generations_equal']} of {lm_eval['n']}"
                       if lm_eval else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def breakdown_table(results: dict, field: str) -> str:
    groups = _group_order(field, {g for run in results.values() for g in run[f"by_{field}"]})
    names = list(results)
    lines = ["| " + BREAKDOWNS[field] + " | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(_percent(results[n][f"by_{field}"].get(group)) for n in names) + " |")
    return "\n".join(lines)


def copy_probe_table(results: dict) -> str:
    """Copy gain (nats per token) by step, one column per run that has a probe."""
    names = [name for name, run in results.items() if run.get("copy_probe")]
    gains = {name: {row["step"]: row["copy_gain"] for row in results[name]["copy_probe"]} for name in names}
    steps = sorted({step for by_step in gains.values() for step in by_step})
    lines = ["| step | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for step in steps:
        lines.append(f"| {step:,} | " + " | ".join(_fmt(gains[n].get(step), ".3f", "-") for n in names) + " |")
    return "\n".join(lines)


def write_markdown(results: dict, records_path: Path, path: Path) -> None:
    parts = [
        "# Recall-intensive corpus: model comparison\n",
        f"Recall: greedy generations of `linmix lm eval` on the records of `{records_path}` (a run evaluated "
        "with `--limit N`: the first N), scored \"contains\" (the gold value occurs in the generation, ignoring case); "
        "cells are accuracy (correct/records). "
        f"State bytes: the recurrent state of one sequence at fp32 after {STATE_TOKENS} tokens "
        "(`model.state_size_bytes`, the BASED paper's accounting). Wall time: the sum of the training log's windows.\n",
        main_table(results) + "\n",
    ]
    for field, title in BREAKDOWNS.items():
        if all(f"by_{field}" in run for run in results.values()):
            parts += [f"## Recall by {title}\n", breakdown_table(results, field) + "\n"]
    if any(run.get("copy_probe") for run in results.values()):
        parts += ["## Answer-copy probe\n",
                  "Copy gain in nats per token (benchmarks/lm_copy_probe.py): the loss of an answer value's tokens after its "
                  "first where the record states it minus where the answer repeats it; about 0 for a model that does "
                  "not copy from its context.\n",
                  copy_probe_table(results) + "\n"]
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------- figures

def _save_figure(figure, axes, path: Path, *, legend: bool) -> Path:
    """Grid (and legend), tight layout, write the PNG, close the figure; returns ``path``."""
    import matplotlib.pyplot as plt

    axes.grid(alpha=0.3)
    if legend:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _percent_axis_top(values) -> float:
    """The recall axis's top: 100 once a model passes 50 %, else zoomed (in steps of 5) so that a few
    percent stay readable; always from 0, so the zoom is visible on the axis."""
    highest = max(values, default=0.0)
    return 100.0 if highest > 50 else max(5.0, 5.0 * math.ceil(highest * 1.25 / 5.0))


def write_figures(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, run in results.items():
        axes.scatter(run["state_bytes"], 100 * run["recall"]["contains"], s=40)
        axes.annotate(name, (run["state_bytes"], 100 * run["recall"]["contains"]), textcoords="offset points",
                      xytext=(5, 5), fontsize=9)
    axes.set_xscale("log")
    axes.set_ylim(0, _percent_axis_top([100 * run["recall"]["contains"] for run in results.values()]))
    axes.set_xlabel(f"recurrent state bytes at {STATE_TOKENS} tokens (fp32, log scale)")
    axes.set_ylabel("recall contains (%)")
    axes.set_title("Recall vs state size")
    paths.append(_save_figure(figure, axes, out / "recall_vs_state.png", legend=False))

    groups = _group_order("length_bucket", {g for run in results.values() for g in run["by_length_bucket"]})
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, run in results.items():
        points = [(i, 100 * run["by_length_bucket"][g]["contains"]) for i, g in enumerate(groups) if g in run["by_length_bucket"]]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_xlabel("context length (bytes)")
    axes.set_ylabel("recall contains (%)")
    axes.set_ylim(0, _percent_axis_top([100 * run["by_length_bucket"][g]["contains"]
                                        for run in results.values() for g in run["by_length_bucket"]]))
    axes.set_title("Recall by context length")
    paths.append(_save_figure(figure, axes, out / "recall_vs_length.png", legend=True))

    figure, axes = plt.subplots(figsize=(6, 4.5))
    by_tokens = all(run["train"]["tokens_per_step"] for run in results.values())
    x_key = "tokens" if by_tokens else "step"
    for name, run in results.items():
        curve = run["train"]["curve"]
        (line,) = axes.plot([p[x_key] for p in curve], [p["loss"] for p in curve], label=name,
                            marker="." if len(curve) < 30 else None)
        evals = run["train"]["eval_curve"]
        if evals:
            axes.plot([p[x_key] for p in evals], [p["loss"] for p in evals], linestyle="--", marker=".",
                      color=line.get_color(), label=f"{name} (held-out)")
    axes.set_xlabel("tokens trained" if by_tokens else "optimizer steps (no lm_train_config.json for tokens)")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title("Learning curves")
    paths.append(_save_figure(figure, axes, out / "learning_curves.png", legend=True))

    probed = {name: run["copy_probe"] for name, run in results.items() if run.get("copy_probe")}
    if probed:
        figure, axes = plt.subplots(figsize=(6, 4.5))
        x_key = "tokens" if all(row["tokens"] is not None for rows in probed.values() for row in rows) else "step"
        for name, rows in probed.items():
            axes.plot([row[x_key] for row in rows], [row["copy_gain"] for row in rows], marker="o", label=name)
        axes.axhline(0.0, color="gray", linewidth=0.8)
        axes.set_xlabel("tokens trained" if x_key == "tokens" else "optimizer steps")
        axes.set_ylabel("copy gain (nats / token)")
        axes.set_title("Answer-copy probe")
        paths.append(_save_figure(figure, axes, out / "copy_gain.png", legend=True))
    return paths


# ---------------------------------------------------------------------------------- main
def build_report(runs: dict[str, Path], records_path: Path, out: Path, lm_eval: dict[str, Path] | None = None,
                 probes: dict[str, list[Path]] | None = None) -> dict:
    """Summarize every run, write results.md / results.json / the figures under ``out``; returns the results."""
    lm_eval, probes = lm_eval or {}, probes or {}
    unknown = sorted(set(lm_eval) - set(runs))
    if unknown:
        raise ValueError(f"--lm-eval names {unknown} that no --run names (runs: {list(runs)})")
    if not runs:
        raise ValueError("give at least one --run NAME=RUN_DIR")
    records = load_recall_eval(records_path)
    for record in records:
        if "answer_distance_tokens" in record:
            record["answer_distance"] = bucket_name(record["answer_distance_tokens"], DISTANCE_EDGES)
    results = {name: summarize_run(name, run_dir, records, records_path, lm_eval.get(name), probes.get(name))
               for name, run_dir in runs.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(results, records_path, out / "results.md")
    write_figures(results, out)
    (out / "results.json").write_text(json.dumps({"records": str(records_path), "state_tokens": STATE_TOKENS,
                                                  "runs": results}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a `linmix lm train` run folder with eval.json (repeatable; table order)")
    parser.add_argument("--records", type=Path, required=True,
                        help="the recall prompts with metadata, e.g. data/recall/eval/recall_heldout.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md, results.json and the figures")
    parser.add_argument("--lm-eval", action="append", default=[], metavar="NAME=PATH",
                        help="an lm_eval --output_path folder (with --log_samples) for run NAME (repeatable)")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME=FILE",
                        help="a copy-probe file of run NAME (repeatable, also for one run; default RUN_DIR/copy_probe.jsonl)")
    args = parser.parse_args(argv)
    try:
        runs = parse_named(args.run, "--run")
        results = build_report(runs, args.records, args.out, parse_named(args.lm_eval, "--lm-eval"),
                               parse_probe_files(args.probe, runs))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print((args.out / "results.md").read_text())
    probe_figure = ", copy_gain.png" if any(run.get("copy_probe") for run in results.values()) else ""
    print(f"wrote {args.out / 'results.md'}, results.json, recall_vs_state.png, recall_vs_length.png, learning_curves.png"
          f"{probe_figure} ({len(results)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

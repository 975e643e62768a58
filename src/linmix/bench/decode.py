"""Decode throughput at growing context: BASED (constant-size recurrent state) vs a Transformer++
(KV cache), measured side by side in one process with random weights.

    rows = measure_decode_throughput(DecodeBenchConfig(contexts=(256, 1024, 4096)))
    paths = write_decode_report(rows, "out/")      # decode.json, decode.md, decode.png

For each context length T both models prefill a T-token prompt once, then decode greedily one
token at a time; the rate counts decode steps only (prefill excluded). A KV-cache model attends
over all T cached keys at every step, so its step cost grows with T; BASED's state (linear-attention
sums, a sliding-window ring buffer, short-conv history) has a fixed size, so its rate stays flat.
The two models have (nearly) the same parameter count: the Transformer++'s MLP width is chosen to
match BASED's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

__all__ = ["DecodeBenchConfig", "DecodeRun", "build_decode_models", "measure_decode", "measure_decode_throughput",
           "plot_decode_throughput", "write_decode_report"]


@dataclass
class DecodeBenchConfig:
    """What to measure. ``contexts``: prompt lengths T; ``new_tokens``: decode steps per run (a run
    stops early after ``max_seconds_per_run`` and is rated on the steps it did); ``repeats``: runs
    per point, the fastest is kept (a shared machine adds noise only upward)."""

    contexts: tuple[int, ...] = (256, 1024, 4096, 8192)
    new_tokens: int = 64
    batch: int = 1
    d_model: int = 256
    n_layer: int = 8
    vocab_size: int = 8192
    window: int = 64
    max_seconds_per_run: float = 4.0
    repeats: int = 2
    threads: int | None = None
    seed: int = 0
    models: tuple[str, ...] = ("BASED", "Transformer++")

    def __post_init__(self) -> None:
        self.contexts = tuple(int(c) for c in self.contexts)
        self.models = tuple(self.models)
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"contexts must be positive prompt lengths, got {self.contexts}")
        for name in ("new_tokens", "batch", "d_model", "n_layer", "vocab_size", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % 64:
            raise ValueError(f"d_model must be a multiple of 64 (heads of 64 dims), got {self.d_model}")
        unknown = [m for m in self.models if m not in ("BASED", "Transformer++")]
        if unknown or not self.models:
            raise ValueError(f"models must be among ('BASED', 'Transformer++'), got {self.models}")


@dataclass
class DecodeRun:
    """One measurement: ``tokens_per_s`` = batch * decode_steps / decode_s."""

    model: str
    context: int
    batch: int
    decode_steps: int
    decode_s: float
    prefill_s: float
    state_bytes: int
    tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens_per_s = self.batch * self.decode_steps / max(self.decode_s, 1e-9)


def build_decode_models(config: DecodeBenchConfig) -> dict[str, Any]:
    """BASED (the based-small layer pattern, cut to ``n_layer``) and a Transformer++ whose MLP width
    matches BASED's parameter count, both random and in eval mode."""
    from linmix.lm import BasedForCausalLM, preset
    from linmix.lm.baselines import parameter_matched_transformer

    torch.manual_seed(config.seed)
    heads = config.d_model // 64
    pattern = preset("based-small").layer_types
    layer_types = [pattern[i % len(pattern)] for i in range(config.n_layer)]
    based_config = preset(
        "based-small", d_model=config.d_model, n_layer=config.n_layer, mlp_hidden=2 * config.d_model,
        vocab_size=config.vocab_size, linear_attention_heads=heads, num_heads=heads, window=config.window,
        layer_types=layer_types,
    )
    models: dict[str, Any] = {}
    based = BasedForCausalLM(based_config).eval()
    if "BASED" in config.models:
        models["BASED"] = based
    if "Transformer++" in config.models:
        models["Transformer++"] = BasedForCausalLM(parameter_matched_transformer(based_config, multiple_of=32)).eval()
    return models


@torch.no_grad()
def measure_decode(model: Any, prompt: torch.Tensor, new_tokens: int, max_seconds: float) -> tuple[float, float, int, int]:
    """Prefill ``prompt [B, T]`` then decode greedily; returns (prefill s, decode s, decode steps, state bytes)."""
    start = time.perf_counter()
    out = model(prompt, return_state=True, logits_to_keep=1)
    token, state = out.logits[:, -1].argmax(-1), out.state
    prefill = time.perf_counter() - start
    steps = 0
    start = time.perf_counter()
    while steps < new_tokens and (steps == 0 or time.perf_counter() - start < max_seconds):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
        steps += 1
    return prefill, time.perf_counter() - start, steps, int(state.nbytes())


def measure_decode_throughput(
    config: DecodeBenchConfig | None = None, *, progress: bool | Callable[[str], None] = False
) -> list[DecodeRun]:
    """Measure every model at every context (interleaved, fastest of ``repeats``); one row per pair."""
    config = config or DecodeBenchConfig()
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    try:
        models = build_decode_models(config)
        report = progress if callable(progress) else None
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(config.contexts) * len(models) * config.repeats, desc="decode throughput", unit="run")
        for model in models.values():  # untimed warm-up: first calls pay one-time allocation and dispatch costs
            measure_decode(model, torch.zeros(config.batch, 8, dtype=torch.long), 2, config.max_seconds_per_run)
        rows = []
        for context in config.contexts:
            prompt = torch.randint(0, config.vocab_size, (config.batch, context), generator=torch.Generator().manual_seed(context))
            best: dict[str, DecodeRun] = {}
            for _ in range(config.repeats):
                for name, model in models.items():  # interleaved: machine noise hits both alike
                    prefill, decode, steps, state_bytes = measure_decode(model, prompt, config.new_tokens, config.max_seconds_per_run)
                    run = DecodeRun(name, context, config.batch, steps, decode, prefill, state_bytes)
                    if name not in best or run.tokens_per_s > best[name].tokens_per_s:
                        best[name] = run
                    if bar is not None:
                        bar.update(1)
            for name in models:
                rows.append(best[name])
                if report is not None:
                    report(f"T={context} {name}: {best[name].tokens_per_s:.0f} tok/s, state {best[name].state_bytes / 2**20:.2f} MiB")
        if bar is not None:
            bar.close()
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def _table(rows: Sequence[DecodeRun]) -> str:
    contexts = sorted({r.context for r in rows})
    names = list(dict.fromkeys(r.model for r in rows))
    by = {(r.model, r.context): r for r in rows}
    header = "| context T | " + " | ".join(f"{n} tok/s | {n} state MiB" for n in names)
    ratio = "BASED" in names and "Transformer++" in names
    header += " | BASED / Transformer++ |" if ratio else " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(names) + (1 if ratio else 0))]
    for t in contexts:
        cells = []
        for n in names:
            r = by.get((n, t))
            cells += [f"{r.tokens_per_s:.0f}", f"{r.state_bytes / 2**20:.2f}"] if r else ["-", "-"]
        line = f"| {t} | " + " | ".join(cells)
        if ratio and (("BASED", t) in by and ("Transformer++", t) in by):
            line += f" | {by['BASED', t].tokens_per_s / by['Transformer++', t].tokens_per_s:.2f}x"
        lines.append(line + " |")
    return "\n".join(lines)


def plot_decode_throughput(rows: Sequence[DecodeRun], path: str | PathLike[str], *, title: str | None = None) -> Path:
    """Decode tokens/s and decode-state MiB against context length, one line per model (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r.model for r in rows))
    colors = {"BASED": "#1f77b4", "Transformer++": "#d62728"}
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        mine = sorted((r for r in rows if r.model == name), key=lambda r: r.context)
        xs = [r.context for r in mine]
        speed.plot(xs, [r.tokens_per_s for r in mine], "o-", label=name, color=colors.get(name))
        memory.plot(xs, [r.state_bytes / 2**20 for r in mine], "o-", label=name, color=colors.get(name))
    contexts = sorted({r.context for r in rows})
    for axis, label in ((speed, "decode tokens / s"), (memory, "decode state (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.minorticks_off()
        axis.set_xlabel("context length T (prompt tokens)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    speed.set_ylim(bottom=0)
    figure.suptitle(title or "Decode at growing context: recurrent state (BASED) vs KV cache (Transformer++)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_decode_report(rows: Sequence[DecodeRun], out_dir: str | PathLike[str], config: DecodeBenchConfig | None = None) -> dict[str, Path]:
    """Write ``decode.json`` (config and rows), ``decode.md`` (the table) and ``decode.png`` (the plot) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "decode.json"
    threads = (config.threads if config else None) or torch.get_num_threads()
    payload = {"config": asdict(config) if config else None, "threads": threads, "rows": [asdict(r) for r in rows]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    markdown = out / "decode.md"
    markdown.write_text(_table(rows) + "\n")
    title = None
    if config is not None:
        title = (f"Decode at growing context: BASED (recurrent state) vs Transformer++ (KV cache)\n"
                 f"batch {config.batch}, {config.n_layer} layers, d_model {config.d_model}, random weights, "
                 f"{config.threads or torch.get_num_threads()} CPU threads")
    return {"json": json_path, "table": markdown, "plot": plot_decode_throughput(rows, out / "decode.png", title=title)}

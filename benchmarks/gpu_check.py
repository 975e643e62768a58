#!/usr/bin/env python
"""GPU check: every GPU path against its CPU reference, then the papers' speed comparisons, in one run.

1. Correctness (fp32 and bf16): each GPU path (fused Triton decode step, Triton Bi-WKV forward and
   gradients, FlexAttention sliding-window prefill, linear-attention prefill (flash-linear-attention's
   kernel when installed), the CUDA-graph decoder, a whole BASED forward) against the reference
   computed on CPU; RMS-relative error against a per-dtype bound.
2. Speed, random weights in bf16, fixed seed, models side by side in one run:
   (a) decode throughput generating ``--new-tokens`` (1024) tokens at batch 1, 16, 128: a
       1.3B-shaped BASED (preset based-1b: d 1792, 36 layers), eager and with the CUDA-graph step,
       vs a Transformer++ of the same shape (36 attention layers, MLP width matched to BASED's
       parameter count) decoding with a preallocated KV cache through SDPA (flash / memory-efficient);
   (b) prefill time at 2k, 4k, 8k, 16k tokens (batch 1) for the same pair;
   (c) RWKV-SAM small vs the same-scale attention encoder at 1024 and 2048 px (images/s, batch
       ``--sam-batch``);
   plus op-level timings of the kernels against their torch forms (to confirm the dispatch defaults).

It prints tables (absolute times and ratios) and writes JSON (``--json``) and Markdown
(``--markdown``). A time budget (``--budget-s``, default 420 s) skips what would not fit, marking it
"skipped" in the tables; the run fits in 8 minutes of GPU time. Exit status 1 if a check failed.

On a GPU machine (torch with CUDA and triton installed there; linmix from this checkout, no network
needed; flash-linear-attention optional, carried as a wheel)::

    PYTHONPATH=src python benchmarks/gpu_check.py --json docs/benchmarks_gpu.json --markdown gpu.md

``--tiny`` runs every part end to end at toy sizes (on CPU too; with ``TRITON_INTERPRET=1`` the
Triton kernels are checked in the interpreter), which is how the tests keep this script working.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from linmix.layers.attention import KVCache
from linmix.lm import BasedForCausalLM, preset
from linmix.lm.baselines import parameter_matched_transformer
from linmix.lm.cuda_graph import GraphedGreedyDecoder
from linmix.lm.generation import prefill as run_prefill
from linmix.ops import (
    LinearAttentionState,
    bi_wkv,
    bi_wkv_reference,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    sliding_window_attention,
    sliding_window_attention_reference,
)
from linmix.ops.feature_maps import taylor_feature_dim
from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.utils.testing import rms_relative_error

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
VOCAB = 50257
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


# ----------------------------------------------------------------------------------------------
# helpers


class Clock:
    """Wall time on the device: synchronises before reading (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device = device
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def time(self, fn, repeats: int, warmup: int = 1) -> float:
        """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def out_of_memory_errors():
    return (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else (MemoryError,)


# ----------------------------------------------------------------------------------------------
# 1. correctness


def run_checks(device: torch.device, tiny: bool) -> list[dict]:
    checks: list[dict] = []
    has_triton = triton_usable(device)

    def record(name: str, dtype: torch.dtype, error: float, note: str = "", tolerance: float | None = None) -> None:
        tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
        checks.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "rms_rel_error": error,
                       "tolerance": tolerance, "passed": bool(error <= tolerance), "note": note})

    def skip(name: str, why: str) -> None:
        checks.append({"check": name, "dtype": "-", "rms_rel_error": None, "tolerance": None, "passed": None, "note": why})

    @contextlib.contextmanager
    def guarded(name: str, dtype: torch.dtype | None = None):
        """A path that raises is a failed check, not a lost run (the GPU time is short)."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 (any failure of a GPU path is reported as such)
            checks.append({"check": name, "dtype": str(dtype).removeprefix("torch.") if dtype else "-", "rms_rel_error": None,
                           "tolerance": None, "passed": False, "note": f"raised {type(error).__name__}: {error}"[:300]})

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    length = 40 if tiny else 1000
    batch, heads, feature_dim, head_dim = 2, 4, 16, 64
    for dtype in (torch.float32, torch.bfloat16):
        q, k = randn(batch, length, heads, feature_dim, scale=0.5), randn(batch, length, heads, feature_dim, scale=0.5)
        v = randn(batch, length, heads, head_dim)
        with guarded("linear attention prefill", dtype):
            # The default CUDA path (fla's parallel_based when installed).
            from linmix.ops.linear_attention import _fla_parallel_based

            expected = linear_attention_reference(q.double(), k.double(), v.double())
            actual = linear_attention(*(t.to(device, dtype) for t in (q, k, v)))
            path = "fla parallel_based" if (device.type == "cuda" and _fla_parallel_based() is not None) else "torch chunked"
            record("linear attention prefill", dtype, rms_relative_error(actual, expected), path)

        if has_triton:
            with guarded("Taylor decode step (Triton)", dtype):  # from a state after a prompt
                _, state = linear_attention(q.double()[:, :-1], k.double()[:, :-1], v.double()[:, :-1], return_final_state=True)
                reference_state = LinearAttentionState(kv=state.kv.clone(), k_sum=state.k_sum.clone())
                expected, _ = linear_attention_step(reference_state, q.double()[:, -1], k.double()[:, -1], v.double()[:, -1])
                kernel_state = LinearAttentionState(kv=state.kv.float().to(device), k_sum=state.k_sum.float().to(device))
                actual, _ = linear_attention_step(kernel_state, *(t[:, -1].to(device, dtype) for t in (q, k, v)), backend="triton")
                record("Taylor decode step (Triton)", dtype, rms_relative_error(actual, expected))
                record("Taylor decode step state (Triton)", dtype, rms_relative_error(kernel_state.kv, reference_state.kv))
        else:
            skip("Taylor decode step (Triton)", "triton not usable here (no CUDA, TRITON_INTERPRET unset)")

        with guarded("sliding-window prefill (FlexAttention)", dtype):  # with left padding
            window = 16 if tiny else 128
            q, k, v = (randn(batch, length, heads, head_dim) for _ in range(3))
            mask = torch.ones(batch, length, dtype=torch.bool)
            mask[0, : length // 3] = False
            expected = sliding_window_attention_reference(q.double(), k.double(), v.double(), window=window, key_padding_mask=mask)
            backend = "auto" if device.type == "cuda" else "flex"
            actual = sliding_window_attention(*(t.to(device, dtype) for t in (q, k, v)), window=window,
                                              key_padding_mask=mask.to(device), backend=backend)
            record("sliding-window prefill (FlexAttention)", dtype, rms_relative_error(actual, expected))

        if has_triton:
            with guarded("Bi-WKV forward (Triton)", dtype):  # at a Vision-RWKV-like scale: w / T, u / T
                tokens, channels = (24, 40) if tiny else (1024, 384)
                w, u = randn(channels, scale=3.0) / tokens, randn(channels) / tokens
                k, v = randn(1, tokens, channels, scale=2.0), randn(1, tokens, channels)
                expected = bi_wkv_reference(w.double(), u.double(), k.double(), v.double())
                actual = bi_wkv(w.to(device), u.to(device), k.to(device, dtype), v.to(device, dtype), backend="triton",
                                chunk_size=8 if tiny else 64)
                record("Bi-WKV forward (Triton)", dtype, rms_relative_error(actual, expected))
        else:
            skip("Bi-WKV forward (Triton)", "triton not usable here")

    if has_triton:
        with guarded("Bi-WKV gradients (Triton fwd + torch bwd)", torch.float32):
            tokens, channels = (12, 16) if tiny else (256, 128)
            inputs = [randn(channels) / tokens, randn(channels) / tokens, randn(1, tokens, channels), randn(1, tokens, channels)]
            upstream = randn(1, tokens, channels)
            leaves = [t.double().requires_grad_() for t in inputs]
            expected = torch.autograd.grad(bi_wkv_reference(*leaves), leaves, upstream.double())
            leaves = [t.to(device).requires_grad_() for t in inputs]
            actual = torch.autograd.grad(bi_wkv(*leaves, backend="triton"), leaves, upstream.to(device))
            record("Bi-WKV gradients (Triton fwd + torch bwd)", torch.float32, max(rms_relative_error(a, e) for a, e in zip(actual, expected)))

    # Whole model (BASED with all three mixers) against CPU fp32, and the graphed decode step against
    # the model's own step on the same device, fed the same tokens, past several ring-buffer wraps.
    torch.manual_seed(0)
    layer_types = ["base_conv", "linear_attention", "sliding_window", "base_conv"]
    if tiny:
        config = preset("based-tiny", n_layer=4, layer_types=layer_types, window=8)
    else:
        config = preset("based-small", n_layer=4, layer_types=layer_types, vocab_size=512, window=32)
    prompt_length, steps = (12, 12) if tiny else (40, 80)
    reference_model = BasedForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in reference_model.parameters():
            parameter.mul_(3.0)  # larger than the init, so that greedy tokens vary
    prompt = torch.randint(0, config.vocab_size, (2, prompt_length), generator=generator)
    with torch.no_grad():
        expected_logits = reference_model(prompt).logits
    for dtype in (torch.float32, torch.bfloat16):
        model = BasedForCausalLM(config).eval()
        model.load_state_dict(reference_model.state_dict())
        model = model.to(device, dtype)
        with guarded("BASED forward", dtype), torch.no_grad():
            # bf16 weights and activations through 4 blocks: a looser end-to-end bound than one op's.
            record("BASED forward", dtype, rms_relative_error(model(prompt.to(device)).logits.float(), expected_logits),
                   tolerance=1e-4 if dtype == torch.float32 else 6e-2)
        name = "graphed decode step vs model.step" if device.type == "cuda" else "static decode step (eager) vs model.step"
        with guarded(name, dtype), torch.no_grad():
            logits, state = run_prefill(model, prompt.to(device), None, None)
            token = logits.argmax(-1)
            eager_state = state.clone()
            decoder = GraphedGreedyDecoder(model, state, token)
            worst = 0.0
            for _ in range(steps):
                previous = decoder.token.clone()
                decoder.step()
                expected, eager_state = model.step(previous, eager_state)
                worst = max(worst, rms_relative_error(decoder.logits.float(), expected.float()))
            decoder.finish()
            record(name, dtype, worst, f"worst step of {steps} (window {config.window})")
    return checks


# ----------------------------------------------------------------------------------------------
# 2. speed


def build_pair(tiny: bool, device: torch.device, dtype: torch.dtype):
    """BASED (based-1b shape) and a same-shape Transformer++ with the MLP width matching its params."""
    if tiny:
        based_config = preset("based-tiny", vocab_size=512)
    else:
        based_config = preset("based-1b", vocab_size=VOCAB)
    transformer_config = parameter_matched_transformer(based_config, multiple_of=8)
    torch.manual_seed(0)
    with torch.device(device):
        based = BasedForCausalLM(based_config).to(dtype).eval()
        transformer = BasedForCausalLM(transformer_config).to(dtype).eval()
    return {"BASED": based, "Transformer++": transformer}


def presize_kv_caches(state, total: int) -> None:
    """Replace each growing KV cache by one of exactly ``total`` slots (no doubling during decode)."""
    for index, layer_state in enumerate(state.layers):
        if isinstance(layer_state, KVCache) and layer_state.capacity < total:
            batch, heads, _, head_dim = layer_state.k.shape
            cache = KVCache.empty(batch, heads, head_dim, capacity=total, device=layer_state.k.device, dtype=layer_state.k.dtype)
            used = layer_state.length
            cache.append(layer_state.k[:, :, :used], layer_state.v[:, :, :used], layer_state.valid[:, :used])
            state.layers[index] = cache


def eager_decode(model, state, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy steps through the model's own layer steps (model.step minus its id check,
    which reads the ids back to the host every token)."""
    dtype = model.dtype
    for _ in range(steps):
        residual = model._residual(token)
        for index, block in enumerate(model.transformer.layers):
            residual, state.layers[index] = block.step(residual, dtype, state.layers[index])
        state.seen += 1
        token = model._logits(residual).argmax(dim=-1)
    return token


def measure_decode(models, clock: Clock, batches, prompt_length: int, new_tokens: int, device) -> list[dict]:
    rows = []
    for batch in batches:
        row = {"batch": batch}
        for name, model in models.items():
            variants = ["eager", "CUDA graph"] if (name == "BASED" and device.type == "cuda") else ["eager"]
            for variant in variants:
                key = f"{name} ({variant})"
                if clock.over_budget():
                    row[key] = {"skipped": "time budget"}
                    continue
                reset_peak(device)
                try:
                    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_length), device=device)
                    with torch.no_grad():
                        logits, state = run_prefill(model, prompt, None, 2048)
                        presize_kv_caches(state, prompt_length + new_tokens + 1)
                        token = logits.argmax(-1)
                        capture_s = None
                        if variant == "CUDA graph":
                            start = time.perf_counter()
                            decoder = GraphedGreedyDecoder(model, state, token)
                            clock.sync()
                            capture_s = time.perf_counter() - start

                            def run():
                                for _ in range(new_tokens):
                                    decoder.step()
                        else:
                            eager_decode(model, state, token, 2)  # warm-up (kernel compilation)

                            def run():
                                eager_decode(model, state, token, new_tokens)
                        clock.sync()
                        start = time.perf_counter()
                        run()
                        clock.sync()
                        seconds = time.perf_counter() - start
                    row[key] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds,
                                "ms_per_step": 1e3 * seconds / new_tokens, "peak_gib": peak_gib(device),
                                "capture_s": capture_s}
                except out_of_memory_errors() as error:
                    row[key] = {"skipped": f"out of memory ({type(error).__name__})"}
                finally:
                    state = decoder = None  # noqa: F841 (free the caches before the next run)
        rows.append(row)
        print(f"  decode batch {batch}: " + ", ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in v else f"{k} {v['skipped']}"
            for k, v in row.items() if k != "batch"), flush=True)
    return rows


def measure_prefill(models, clock: Clock, lengths, repeats: int, device) -> list[dict]:
    rows = []
    for length in lengths:
        row = {"tokens": length}
        for name, model in models.items():
            if clock.over_budget():
                row[name] = {"skipped": "time budget"}
                continue
            reset_peak(device)
            prompt = torch.randint(0, model.config.vocab_size, (1, length), device=device)
            try:
                with torch.no_grad():
                    seconds = clock.time(lambda: model(prompt, logits_to_keep=1), repeats)
                row[name] = {"seconds": seconds, "tokens_per_s": length / seconds, "peak_gib": peak_gib(device)}
            except out_of_memory_errors() as error:
                row[name] = {"skipped": f"out of memory ({type(error).__name__})"}
        rows.append(row)
        print(f"  prefill {length}: " + ", ".join(
            f"{k} {1e3 * v['seconds']:.1f} ms" if "seconds" in v else f"{k} {v['skipped']}" for k, v in row.items() if k != "tokens"), flush=True)
    return rows


def measure_sam(clock: Clock, variant: str, sizes, batch: int, repeats: int, device, dtype) -> list[dict]:
    """RWKV-SAM's image encoder vs the same-scale attention encoder (backbone variant ``variant``)."""
    torch.manual_seed(0)
    with torch.device(device):
        encoders = {"RWKV-SAM": RwkvSamImageEncoder(variant, "rwkv").to(dtype).eval(),
                    "attention": RwkvSamImageEncoder(variant, "attention").to(dtype).eval()}
    rows = []
    for size in sizes:
        row = {"size": size, "batch": batch}
        image = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        for name, encoder in encoders.items():
            if clock.over_budget():
                row[name] = {"skipped": "time budget"}
                continue
            reset_peak(device)
            try:
                with torch.no_grad():
                    seconds = clock.time(lambda: encoder(image), repeats)
                row[name] = {"seconds": seconds, "images_per_s": batch / seconds, "peak_gib": peak_gib(device)}
            except out_of_memory_errors() as error:
                row[name] = {"skipped": f"out of memory ({type(error).__name__})"}
        rows.append(row)
        print(f"  SAM {size} px: " + ", ".join(
            f"{k} {v['images_per_s']:.2f} img/s" if "images_per_s" in v else f"{k} {v['skipped']}"
            for k, v in row.items() if k not in ("size", "batch")), flush=True)
    return rows


def measure_ops(clock: Clock, tiny: bool, repeats: int, device, dtype) -> list[dict]:
    """Kernel vs torch form of the same op, at the shapes the models use."""
    rows = []
    if not triton_usable(device):
        return rows
    shapes = [(1, 16, 32)] if tiny else [(1, 4096, 384), (1, 16384, 384)]  # RWKV-SAM small, 1024 / 2048 px
    for batch, tokens, channels in shapes:
        w, u = torch.randn(channels, device=device) / tokens, torch.randn(channels, device=device) / tokens
        k, v = (torch.randn(batch, tokens, channels, device=device, dtype=dtype) for _ in range(2))
        row = {"op": f"bi_wkv B={batch} T={tokens} C={channels}"}
        with torch.no_grad():
            for backend in ("torch", "triton"):
                if clock.over_budget():
                    row[backend] = None
                    continue
                row[backend] = clock.time(lambda: bi_wkv(w, u, k, v, backend=backend), repeats)
        rows.append(row)
    heads, feature_dim, value_dim = (2, 8, 16) if tiny else (16, 16, 112)  # based-1b's linear-attention layer
    for batch in ((2,) if tiny else (1, 16, 128)):
        state = LinearAttentionState.empty(batch, heads, taylor_feature_dim(feature_dim), value_dim, device=device)
        q, k = (torch.randn(batch, heads, feature_dim, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(batch, heads, value_dim, device=device, dtype=dtype)
        row = {"op": f"linear_attention_step B={batch} H={heads} f={feature_dim} Dv={value_dim}"}
        with torch.no_grad():
            for backend in ("torch", "triton"):
                row[backend] = None if clock.over_budget() else clock.time(
                    lambda: linear_attention_step(state, q, k, v, backend=backend), repeats, warmup=2)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# report


def _cell(entry: dict | None, key: str, fmt: str) -> str:
    if entry is None:
        return "—"
    if "skipped" in entry:
        return entry["skipped"]
    value = entry.get(key)
    return "—" if value is None else format(value, fmt)


def _ratio(numerator: dict | None, denominator: dict | None, key: str, invert: bool = False) -> str:
    if not numerator or not denominator or key not in numerator or key not in denominator:
        return "—"
    value = numerator[key] / denominator[key]
    return f"**{1 / value if invert else value:.2f}x**"


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
             f"flash-linear-attention {report['fla'] or 'not installed'}; {report['settings']['dtype']} random weights; "
             f"{report['elapsed_s']:.0f} s in all.", "", "Correctness (GPU path vs CPU reference, RMS-relative error):", "",
             "| check | dtype | error | bound | result | note |", "|---|---|---|---|---|---|"]
    for check in report["checks"]:
        error = "—" if check["rms_rel_error"] is None else f"{check['rms_rel_error']:.1e}"
        bound = "—" if check["tolerance"] is None else f"{check['tolerance']:.0e}"
        result = {True: "pass", False: "**FAIL**", None: "—"}[check["passed"]]
        lines.append(f"| {check['check']} | {check['dtype']} | {error} | {bound} | {result} | {check['note']} |")
    lines += ["", f"(a) Decode, {report['settings']['new_tokens']} new tokens after a {report['settings']['prompt']}-token prompt, "
              "greedy (tokens/s, higher is better):", "",
              "| batch | BASED eager | BASED CUDA graph | Transformer++ (KV cache, SDPA) | graph / Transformer++ | eager / Transformer++ | peak GiB BASED / T++ |",
              "|---|---|---|---|---|---|---|"]
    for row in report["decode"]:
        based, graphed, transformer = row.get("BASED (eager)"), row.get("BASED (CUDA graph)"), row.get("Transformer++ (eager)")
        lines.append(f"| {row['batch']} | {_cell(based, 'tokens_per_s', '.0f')} | {_cell(graphed, 'tokens_per_s', '.0f')} | "
                     f"{_cell(transformer, 'tokens_per_s', '.0f')} | {_ratio(graphed, transformer, 'tokens_per_s')} | "
                     f"{_ratio(based, transformer, 'tokens_per_s')} | {_cell(based, 'peak_gib', '.1f')} / {_cell(transformer, 'peak_gib', '.1f')} |")
    lines += ["", "(b) Prefill, batch 1 (ms, lower is better):", "",
              "| tokens | BASED | Transformer++ | Transformer++ / BASED |", "|---|---|---|---|"]
    for row in report["prefill"]:
        based, transformer = row.get("BASED"), row.get("Transformer++")
        lines.append(f"| {row['tokens']} | {_fmt_ms(based)} | {_fmt_ms(transformer)} | {_ratio(transformer, based, 'seconds')} |")
    variant = report["settings"]["sam_variant"]
    lines += ["", "(c) Image encoder (images/s, higher is better):", "",
              f"| image | batch | RWKV-SAM {variant} | attention {variant} | RWKV / attention |", "|---|---|---|---|---|"]
    for row in report["sam"]:
        rwkv, attention = row.get("RWKV-SAM"), row.get("attention")
        lines.append(f"| {row['size']} px | {row['batch']} | {_cell(rwkv, 'images_per_s', '.2f')} | "
                     f"{_cell(attention, 'images_per_s', '.2f')} | {_ratio(rwkv, attention, 'images_per_s')} |")
    if report["ops"]:
        lines += ["", "Kernels vs their torch forms (ms):", "", "| op | torch | Triton | torch / Triton |", "|---|---|---|---|"]
        for row in report["ops"]:
            torch_s, triton_s = row.get("torch"), row.get("triton")
            ratio = f"**{torch_s / triton_s:.2f}x**" if torch_s and triton_s else "—"
            lines.append(f"| {row['op']} | {_ms(torch_s)} | {_ms(triton_s)} | {ratio} |")
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1e3 * seconds:.3f}"


def _fmt_ms(entry: dict | None) -> str:
    if entry is None:
        return "—"
    if "skipped" in entry:
        return entry["skipped"]
    return f"{1e3 * entry['seconds']:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (runs on CPU; used by the tests)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default 1024; tiny 6)")
    parser.add_argument("--prompt", type=int, default=None, help="decode prompt length (default 128; tiny 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="decode batches (default 1 16 128)")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=None, help="default 2048 4096 8192 16384")
    parser.add_argument("--sam-sizes", type=int, nargs="+", default=None, help="default 1024 2048")
    parser.add_argument("--sam-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per prefill / image row (default 3)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip measurements that start after this many seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["checks", "decode", "prefill", "sam", "ops"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    tiny = args.tiny
    new_tokens = args.new_tokens or (6 if tiny else 1024)
    prompt = args.prompt or (8 if tiny else 128)
    batches = args.batches or ([1, 2] if tiny else [1, 16, 128])
    lengths = args.prefill_lengths or ([64, 128] if tiny else [2048, 4096, 8192, 16384])
    sam_sizes = args.sam_sizes or ([64] if tiny else [1024, 2048])
    repeats = args.repeats or (1 if tiny else 3)
    sam_variant = "tiny" if tiny else "small"
    # bf16 as the papers measure; a tiny run on CPU uses fp32 (CPU bf16 convolutions are slow).
    dtype = torch.float32 if (tiny and device.type == "cpu") else torch.bfloat16
    clock = Clock(device, args.budget_s)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare true fp32
        name = f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    fla_version = None
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        fla_version = version("fla-core") if importlib.util.find_spec("fla") else None
    triton_version = None
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        triton_version = version("triton")
    report = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": name, "torch": torch.__version__, "triton": triton_version, "fla": fla_version,
              "settings": {"tiny": tiny, "new_tokens": new_tokens, "prompt": prompt, "batches": batches,
                           "prefill_lengths": lengths, "sam_sizes": sam_sizes, "sam_batch": args.sam_batch, "sam_variant": sam_variant,
                           "repeats": repeats, "dtype": str(dtype).removeprefix("torch."), "budget_s": args.budget_s},
              "checks": [], "decode": [], "prefill": [], "sam": [], "ops": []}
    print(f"device: {name}", flush=True)
    if "checks" not in args.skip:
        print("checks ...", flush=True)
        report["checks"] = run_checks(device, tiny)
        print(f"checks done at {clock.elapsed():.0f} s", flush=True)
    if "decode" not in args.skip or "prefill" not in args.skip:
        models = build_pair(tiny, device, dtype)
        report["parameters"] = {name: model.num_parameters() for name, model in models.items()}
        print("parameters: " + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in report["parameters"].items()), flush=True)
        if "decode" not in args.skip:
            report["decode"] = measure_decode(models, clock, batches, prompt, new_tokens, device)
            print(f"decode done at {clock.elapsed():.0f} s", flush=True)
        if "prefill" not in args.skip:
            report["prefill"] = measure_prefill(models, clock, lengths, repeats, device)
            print(f"prefill done at {clock.elapsed():.0f} s", flush=True)
        del models
        reset_peak(device)
    if "sam" not in args.skip:
        report["sam"] = measure_sam(clock, sam_variant, sam_sizes, args.sam_batch, repeats, device, dtype)
        print(f"image encoders done at {clock.elapsed():.0f} s", flush=True)
    if "ops" not in args.skip:
        report["ops"] = measure_ops(clock, tiny, repeats, device, dtype)
    report["elapsed_s"] = clock.elapsed()
    table = markdown(report)
    print()
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    failed = [check["check"] + " " + check["dtype"] for check in report["checks"] if check["passed"] is False]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

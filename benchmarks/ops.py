#!/usr/bin/env python
"""CPU benchmark of the linmix ops against their references and softmax attention.

Everything is measured side by side in one run (fixed seed, B=1, H=16, f=16, head dim 64) and
printed as a markdown table of times, peak memory and ratios:

- linear attention (chunked O(T)) vs its quadratic reference vs causal SDPA softmax attention;
- sliding-window attention (w=128, blocked) vs SDPA with a T x T band mask;
- bi_wkv O(T) vs the naive O(T^2) form.

Peak memory is the growth of the process's resident-set high-water mark during the call (Linux
VmHWM, reset through /proc/self/clear_refs); glibc's adaptive mmap threshold is pinned so freed
large buffers really go back to the OS between measurements.

    python benchmarks/ops.py            # T = 1k .. 16k, writes docs/benchmarks_ops.json
    python benchmarks/ops.py --quick    # T = 1k .. 4k, a minute or two (the `make demo` job)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linmix.utils.memory import peak_memory_mib, pin_malloc_threshold

from linmix.ops import (
    bi_wkv,
    linear_attention,
    linear_attention_reference,
    sliding_window_attention,
)

HEADS, FEATURE_DIM, HEAD_DIM, WINDOW = 16, 16, 64, 128


def measure_side_by_side(competitors: dict, repeats: int) -> dict:
    """Time competitors interleaved (A, B, C, A, B, C, ...) so machine noise hits them alike.

    Returns {name: (median seconds, peak MiB)}; a competitor given as (fn, n) runs only n timed calls.
    """
    times: dict[str, list[float]] = {name: [] for name in competitors}
    memory: dict[str, float | None] = {}
    with torch.no_grad():
        for name, entry in competitors.items():
            fn = entry[0] if isinstance(entry, tuple) else entry
            _, memory[name] = peak_memory_mib(fn)  # doubles as the warm-up call
        for round_index in range(repeats):
            for name, entry in competitors.items():
                fn, limit = entry if isinstance(entry, tuple) else (entry, repeats)
                if round_index >= limit:
                    continue
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
                del out
    return {name: (statistics.median(times[name]), memory[name]) for name in competitors}


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_mem(mib: float | None) -> str:
    return "—" if mib is None else f"{max(mib, 0.0):.0f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if (a is None or b is None or b == 0) else f"{a / b:.2f}x"


def bench_linear_attention(lengths, repeats, reference_max):
    rows = []
    for length in lengths:
        q = torch.randn(1, length, HEADS, FEATURE_DIM) * 0.5
        k = torch.randn(1, length, HEADS, FEATURE_DIM) * 0.5
        v = torch.randn(1, length, HEADS, HEAD_DIM)
        # SDPA gets the same value width and the model's head dim for q/k.
        qs, ks, vs = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
        competitors = {
            "chunked": lambda: linear_attention(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
        }
        if length <= reference_max:
            competitors["quadratic"] = (lambda: linear_attention_reference(q, k, v), max(1, repeats // 2))
        measured = measure_side_by_side(competitors, repeats)
        chunked, sdpa = measured["chunked"], measured["sdpa"]
        quadratic = measured.get("quadratic", (None, None))
        rows.append({"T": length, "chunked_s": chunked[0], "chunked_mib": chunked[1],
                     "quadratic_s": quadratic[0], "quadratic_mib": quadratic[1],
                     "sdpa_s": sdpa[0], "sdpa_mib": sdpa[1]})
        print(f"  linear attention T={length}: chunked {_fmt_time(chunked[0])}, SDPA {_fmt_time(sdpa[0])}", flush=True)
    return rows


def bench_sliding_window(lengths, repeats, mask_max):
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM) for _ in range(3))
        competitors = {"blocked": lambda: sliding_window_attention(q, k, v, window=WINDOW)}
        if length <= mask_max:
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
            positions = torch.arange(length)
            distance = positions[:, None] - positions[None, :]
            band = (distance >= 0) & (distance <= WINDOW)
            competitors["band"] = lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band)
        measured = measure_side_by_side(competitors, repeats)
        blocked, masked = measured["blocked"], measured.get("band", (None, None))
        rows.append({"T": length, "blocked_s": blocked[0], "blocked_mib": blocked[1],
                     "sdpa_band_s": masked[0], "sdpa_band_mib": masked[1]})
        print(f"  sliding window T={length}: blocked {_fmt_time(blocked[0])}, SDPA+band {_fmt_time(masked[0])}", flush=True)
    return rows


def naive_bi_wkv(w, u, k, v, channel_block: int = 16):
    """The quadratic Bi-WKV in fp32: a T x T softmax per channel (channels in blocks to bound memory)."""
    batch, length, channels = k.shape
    positions = torch.arange(length)
    distance = (positions[:, None] - positions[None, :]).abs().float() - 1.0  # [T, T]
    diagonal = torch.eye(length, dtype=torch.bool)
    out = torch.empty_like(v)
    for start in range(0, channels, channel_block):
        c = slice(start, start + channel_block)
        exponent = -distance[None, None] * w[c, None, None] + k[:, :, c].permute(0, 2, 1)[:, :, None, :]  # [B, c, T, T]
        exponent = torch.where(diagonal, (u[c, None, None] + k[:, :, c].permute(0, 2, 1)[:, :, :, None]), exponent)
        weights = exponent.softmax(-1)
        out[:, :, c] = (weights @ v[:, :, c].permute(0, 2, 1)[..., None]).squeeze(-1).permute(0, 2, 1)
    return out


def bench_bi_wkv(length, channels, repeats):
    w = torch.randn(channels) / length
    u = torch.randn(channels) / length
    k, v = torch.randn(1, length, channels), torch.randn(1, length, channels)
    measured = measure_side_by_side({"fast": lambda: bi_wkv(w, u, k, v),
                                     "naive": (lambda: naive_bi_wkv(w, u, k, v), 1)}, repeats)
    fast, naive = measured["fast"], measured["naive"]
    print(f"  bi_wkv T={length}: O(T) {_fmt_time(fast[0])}, naive {_fmt_time(naive[0])}", flush=True)
    return {"T": length, "C": channels, "fast_s": fast[0], "fast_mib": fast[1], "naive_s": naive[0], "naive_mib": naive[1]}


def warm_up(seconds: float = 3.0) -> None:
    """Run every op at a small size for a few seconds first: the first calls in a fresh process
    (thread pool start, page faults, allocator growth) are several times slower than the rest."""
    q, k, v = (torch.randn(1, 512, HEADS, size) for size in (FEATURE_DIM, FEATURE_DIM, HEAD_DIM))
    w, u = torch.zeros(64), torch.zeros(64)
    x = torch.randn(1, 512, 64)
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            linear_attention(q, k, v)
            sliding_window_attention(v, v, v, window=WINDOW)
            F.scaled_dot_product_attention(v.transpose(1, 2), v.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            bi_wkv(w, u, x, x)


def render(results) -> str:
    lines = [f"B=1, H={HEADS}, f={FEATURE_DIM}, head dim {HEAD_DIM}; {results['threads']} threads, torch {results['torch']}", ""]
    lines += ["### Linear attention (causal): chunked O(T) vs quadratic reference vs causal SDPA", "",
              "| T | chunked | peak | quadratic ref | peak | causal SDPA | peak | SDPA / chunked | ref / chunked |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["linear_attention"]:
        lines.append(f"| {r['T']} | {_fmt_time(r['chunked_s'])} | {_fmt_mem(r['chunked_mib'])} | {_fmt_time(r['quadratic_s'])} | "
                     f"{_fmt_mem(r['quadratic_mib'])} | {_fmt_time(r['sdpa_s'])} | {_fmt_mem(r['sdpa_mib'])} | "
                     f"**{_ratio(r['sdpa_s'], r['chunked_s'])}** | {_ratio(r['quadratic_s'], r['chunked_s'])} |")
    lines += ["", f"### Sliding-window attention (w={WINDOW}): blocked vs SDPA with a T x T band mask", "",
              "| T | blocked | peak | SDPA + band mask | peak | SDPA / blocked |", "|---|---|---|---|---|---|"]
    for r in results["sliding_window"]:
        lines.append(f"| {r['T']} | {_fmt_time(r['blocked_s'])} | {_fmt_mem(r['blocked_mib'])} | {_fmt_time(r['sdpa_band_s'])} | "
                     f"{_fmt_mem(r['sdpa_band_mib'])} | **{_ratio(r['sdpa_band_s'], r['blocked_s'])}** |")
    r = results["bi_wkv"]
    lines += ["", f"### bi_wkv (B=1, C={r['C']}): O(T) vs naive O(T^2) (fp32 T x T softmax per channel)", "",
              "| T | O(T) | peak | naive | peak | naive / O(T) |", "|---|---|---|---|---|---|",
              f"| {r['T']} | {_fmt_time(r['fast_s'])} | {_fmt_mem(r['fast_mib'])} | {_fmt_time(r['naive_s'])} | "
              f"{_fmt_mem(r['naive_mib'])} | **{_ratio(r['naive_s'], r['fast_s'])}** |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    pin_malloc_threshold()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T up to 4k and fewer repeats (about a minute)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        lengths, repeats, wkv_length, wkv_channels = [1024, 2048, 4096], 3, 2048, 64
    else:
        lengths, repeats, wkv_length, wkv_channels = [1024, 2048, 4096, 8192, 16384], 5, 4096, 64
    print(f"linmix ops benchmark ({'quick' if args.quick else 'full'}), {torch.get_num_threads()} threads", flush=True)
    warm_up()
    results = {
        "command": "python benchmarks/ops.py" + (" --quick" if args.quick else ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "linear_attention": bench_linear_attention(lengths, repeats, reference_max=4096),
        "sliding_window": bench_sliding_window(lengths, repeats, mask_max=8192),
        "bi_wkv": bench_bi_wkv(wkv_length, wkv_channels, repeats),
    }
    table = render(results)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

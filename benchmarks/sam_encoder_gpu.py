#!/usr/bin/env python
"""RWKV-SAM small vs the same-scale vision-Mamba and attention image encoders on a CUDA GPU, eager and CUDA-graphed.

At batch 1 a small encoder on a big GPU is bound by kernel launches (hundreds of small ops per call,
each a few microseconds of host work), whatever the token mixer; replaying a captured CUDA graph
removes that host work, and a larger batch amortises it. So each (image size, batch) row is timed
both ways, side by side, in bf16 with random weights:

    python benchmarks/sam_encoder_gpu.py --json gpu_sam.json
    python benchmarks/sam_encoder_gpu.py --sizes 1024 --batches 1 --profile   # + top kernels
    python benchmarks/sam_encoder_gpu.py --sizes 1024 --batches 1 --compile   # + torch.compile

A capture that fails (a host sync inside the forward, say) is reported with its error, not hidden.
On a machine without CUDA it runs eagerly on CPU in fp32 at toy sizes (``--tiny``, for the tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from linmix.sam.backbone import RwkvSamImageEncoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graphed(encoder: torch.nn.Module, image: torch.Tensor):
    """A replay function for ``encoder(image)`` captured as one CUDA graph (static input and output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as capture requires (Triton compiles, cuBLAS handles)
            encoder(image)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        encoder(image)
    return graph.replay


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 1024 2048 (tiny: 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 (tiny: 1)")
    parser.add_argument("--variant", default=None, help="backbone variant (default small; tiny: tiny)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, fp32 on CPU when there is no GPU")
    parser.add_argument("--profile", action="store_true", help="also print the top ops of one RWKV-SAM call")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(mode='reduce-overhead') of each encoder (fused ops + CUDA graphs; compiles per shape)")
    parser.add_argument("--no-mamba", action="store_true", help="skip the vision-Mamba encoders (VMamba SS2D and Vim-style)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = args.sizes or ([64] if args.tiny else [1024, 2048])
    batches = args.batches or ([1] if args.tiny else [1, 8])
    variant = args.variant or ("tiny" if args.tiny else "small")
    torch.manual_seed(0)
    with torch.device(device):
        mixers = {"RWKV-SAM": "rwkv", "attention": "attention"}
        if not args.no_mamba:
            mixers.update({"Mamba": "mamba", "Mamba-bi": "mamba_bi"})
        encoders = {label: RwkvSamImageEncoder(variant, mixer).to(dtype).eval() for label, mixer in mixers.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {variant} encoders, {str(dtype).removeprefix('torch.')}, random weights", flush=True)
    rows = []
    for size in sizes:
        for batch in batches:
            image = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            row = {"size": size, "batch": batch}
            for label, encoder in encoders.items():
                with torch.no_grad():
                    row[f"{label} eager"] = median_seconds(lambda: encoder(image), device, args.repeats)
                if device.type == "cuda":
                    try:
                        replay = graphed(encoder, image)
                        row[f"{label} graph"] = median_seconds(replay, device, args.repeats)
                    except Exception as error:  # report why capture failed: it names the offending op
                        row[f"{label} graph"] = f"capture failed: {type(error).__name__}: {str(error)[:200]}"
                    torch.cuda.empty_cache()
                if args.compile:
                    try:
                        compiled = torch.compile(encoder, mode="reduce-overhead" if device.type == "cuda" else "default")
                        start = time.perf_counter()
                        with torch.no_grad():
                            compiled(image)
                        row[f"{label} compile_s"] = time.perf_counter() - start
                        with torch.no_grad():
                            row[f"{label} compiled"] = median_seconds(lambda: compiled(image), device, args.repeats)
                    except Exception as error:
                        row[f"{label} compiled"] = f"compile failed: {type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print("  " + json.dumps(row), flush=True)

    def cell(row, key):
        value = row.get(key)
        return "—" if value is None else (f"{row['batch'] / value:.1f}" if isinstance(value, float) else value)

    def ratio(row, label, mode):  # how many times faster than the same-scale attention encoder
        a, r = row.get(f"attention {mode}"), row.get(f"{label} {mode}")
        return f"**{a / r:.2f}x**" if isinstance(a, float) and isinstance(r, float) else "—"

    others = [label for label in encoders if label != "attention"]
    modes = ["eager", "graph"] + (["compiled"] if args.compile else [])
    print("\nimages/s (higher is better); x = speed relative to the same-scale attention encoder\n")
    header = [f"{label} {mode}" for mode in modes for label in encoders] + [f"{label} / attention {mode}" for mode in modes for label in others]
    print("| image | batch | " + " | ".join(header) + " |")
    print("|" + "---|" * (2 + len(header)))
    for row in rows:
        cells = [cell(row, f"{label} {mode}") for mode in modes for label in encoders]
        cells += [ratio(row, label, mode) for mode in modes for label in others]
        print(f"| {row['size']} px | {row['batch']} | " + " | ".join(cells) + " |")
    if args.compile:
        print("\ntorch.compile: the first call's compile seconds")
        for row in rows:
            print(f"  {row['size']} px, batch {row['batch']}: "
                  + ", ".join(f"{label} {row.get(f'{label} compile_s', float('nan')):.0f} s" for label in encoders))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        image = torch.randn(batches[0], 3, sizes[0], sizes[0], device=device, dtype=dtype)
        for label, encoder in encoders.items():
            with torch.no_grad(), profile(activities=activities) as prof:
                encoder(image)
                _sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(f"\n{label}, {sizes[0]} px, batch {batches[0]}: top ops by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "variant": variant,
                                         "dtype": str(dtype), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

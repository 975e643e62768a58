#!/usr/bin/env python
"""Image-encoder latency and memory on CPU: RWKV-SAM small vs the same-scale attention backbone vs
the same-scale vision-Mamba backbone (VMamba's SS2D, ``token_mixer="mamba"``; with ``--mamba-bi``
also the Vim-style bidirectional scan) vs SAM ViT-B, batch 1, random weights, measured side by side
(interleaved) in one run. RWKV-SAM also
runs a second time with linmix's native CPU kernels switched off (``LINMIX_FORCE_REFERENCE=1``,
every op a PyTorch op), so the kernels' share of the gap is measured in the same run.

Each measurement runs in its own child process: latency with glibc's default allocator settings,
latency with :func:`linmix.utils.memory.tune_cpu_allocator` (what the ``linmix`` CLI uses), and peak
memory with the mmap threshold pinned low so that freed buffers leave the process between calls.

    python benchmarks/sam_encoder.py                  # 512, 1024 and 2048 px
    python benchmarks/sam_encoder.py --sizes 512 1024 --repeats 3
    python benchmarks/sam_encoder.py --sizes 1024 --mamba-bi --no-memory   # latency only, with mamba_bi

SAM ViT-B comes from the `segment-anything` package (an optional peer: `pip install --no-deps
segment-anything`); its package imports torchvision, which linmix does not need, so small stand-in
modules are placed in sys.modules before importing it. It is skipped when not installed. SAM's ViT
has a fixed 1024 input (absolute position embeddings), so it runs at 1024 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from linmix.ops.dispatch import FORCE_REFERENCE_ENV
from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.utils.memory import peak_memory_mib, tune_cpu_allocator


def sam_vit_b():
    """segment-anything's ViT-B image encoder with random weights, or None if not installed."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.ops", "torchvision.ops.boxes"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.transforms.functional"].resize = None
    sys.modules["torchvision.transforms.functional"].to_pil_image = None
    sys.modules["torchvision.ops.boxes"].batched_nms = None
    sys.modules["torchvision.ops.boxes"].box_area = None
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        from segment_anything.modeling import ImageEncoderViT
    except ImportError:
        return None
    from functools import partial

    return ImageEncoderViT(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4,
                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                           qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=14,
                           out_chans=256).eval()


ALLOCATORS = ("default", "tuned")


class TorchOpsOnly(torch.nn.Module):
    """The same model with linmix's native CPU kernels switched off (``LINMIX_FORCE_REFERENCE=1``
    during the call): every op is a PyTorch op, as before the kernels existed."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        previous = os.environ.get(FORCE_REFERENCE_ENV)
        os.environ[FORCE_REFERENCE_ENV] = "1"
        try:
            return self.model(image)
        finally:
            if previous is None:
                del os.environ[FORCE_REFERENCE_ENV]
            else:
                os.environ[FORCE_REFERENCE_ENV] = previous


TORCH_OPS = "RWKV-SAM small, torch ops"
MAMBA = "Mamba small"
MAMBA_BI = "Mamba-bi small"


def build_models(mamba_bi: bool = False):
    torch.manual_seed(0)
    rwkv = RwkvSamImageEncoder("small", "rwkv").eval()
    models = {
        "RWKV-SAM small": rwkv,
        TORCH_OPS: TorchOpsOnly(rwkv),
        "attention small": RwkvSamImageEncoder("small", "attention").eval(),
        MAMBA: RwkvSamImageEncoder("small", "mamba").eval(),
    }
    if mamba_bi:
        models[MAMBA_BI] = RwkvSamImageEncoder("small", "mamba_bi").eval()
    vit = sam_vit_b()
    if vit is not None:
        models["SAM ViT-B"] = vit
    else:
        print("segment-anything not installed: skipping SAM ViT-B", file=sys.stderr)
    return models


def competitors_at(models, size):
    return {name: m for name, m in models.items() if name != "SAM ViT-B" or size == 1024}


def measure(phase: str, sizes, repeats: int, mamba_bi: bool = False) -> dict:
    """One phase in this process: ``time-default`` / ``time-tuned`` (median seconds, interleaved) or
    ``memory`` (peak extra resident MiB of one call; run with the mmap threshold pinned low)."""
    if phase == "time-tuned" and not tune_cpu_allocator():
        raise SystemExit("the tuned allocator needs Linux with glibc")
    models = build_models(mamba_bi)
    result = {"parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}, "rows": {}}
    for size in sizes:
        image = torch.randn(1, 3, size, size)
        competitors = competitors_at(models, size)
        with torch.no_grad():
            if phase == "memory":
                result["rows"][size] = {name: peak_memory_mib(lambda: model(image))[1] for name, model in competitors.items()}
                continue
            for model in competitors.values():
                model(image)  # warm-up
            times = {name: [] for name in competitors}
            for _ in range(repeats):
                for name, model in competitors.items():
                    start = time.perf_counter()
                    model(image)
                    times[name].append(time.perf_counter() - start)
        result["rows"][size] = {name: statistics.median(t) for name, t in times.items()}
        print(f"  [{phase}] {size} px: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["rows"][size].items()), file=sys.stderr, flush=True)
    return result


def run_phase(phase: str, args) -> dict:
    """A phase in a fresh child process (allocator settings are process-wide and cannot be undone)."""
    env = dict(os.environ)
    if phase == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # freed buffers go back to the OS: VmHWM is the peak
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    command = [sys.executable, __file__, "--phase", phase, "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes)]
    if args.mamba_bi:
        command.append("--mamba-bi")
    output = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output)


def table(results: dict, sizes, repeats: int) -> str:
    counted = results.get("memory", results["time-default"])
    params = {k: v for k, v in counted["parameters"].items() if k != TORCH_OPS}  # same weights as RWKV-SAM small
    names = list(counted["parameters"])
    lines = [f"batch 1, random weights, {torch.get_num_threads()} threads, median of {repeats}; parameters: "
             + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items()), "",
             "| image | allocator | RWKV-SAM small | RWKV-SAM small, torch ops | attention small | SAM ViT-B "
             "| attention / RWKV | attention / RWKV (torch ops) | ViT-B / RWKV |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt_s(row, name):
        return "—" if name not in row else f"{row[name]:.2f} s"

    def ratio(row, name, base="RWKV-SAM small"):
        return "—" if name not in row or base not in row else f"**{row[name] / row[base]:.2f}x**"

    for size in sizes:
        for allocator in ALLOCATORS:
            row = results[f"time-{allocator}"]["rows"][str(size)]
            lines.append(f"| {size} px | {allocator} | {fmt_s(row, 'RWKV-SAM small')} | {fmt_s(row, TORCH_OPS)} | "
                         f"{fmt_s(row, 'attention small')} | {fmt_s(row, 'SAM ViT-B')} | {ratio(row, 'attention small')} | "
                         f"{ratio(row, 'attention small', TORCH_OPS)} | {ratio(row, 'SAM ViT-B')} |")
    mambas = [name for name in (MAMBA, MAMBA_BI) if name in names]
    if mambas:
        lines += ["", "| image | allocator | " + " | ".join(f"{m} | {m} / RWKV | {m} / attention" for m in mambas) + " |",
                  "|---|---|" + "---|---|---|" * len(mambas)]
        for size in sizes:
            for allocator in ALLOCATORS:
                row = results[f"time-{allocator}"]["rows"][str(size)]
                cells = [f"{fmt_s(row, m)} | {ratio(row, m)} | {ratio(row, m, 'attention small')}" for m in mambas]
                lines.append(f"| {size} px | {allocator} | " + " | ".join(cells) + " |")
    if "memory" not in results:
        return "\n".join(lines)
    lines += ["", "| image | peak memory: " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for size in sizes:
        row = results["memory"]["rows"][str(size)]
        lines.append(f"| {size} px | " + " | ".join("—" if name not in row or row[name] is None else f"{row[name]:.0f} MiB" for name in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--mamba-bi", action="store_true", help="also time the Vim-style bidirectional Mamba backbone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory phase")
    parser.add_argument("--phase", choices=["time-default", "time-tuned", "memory"], default=None,
                        help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args(argv)
    if args.phase is not None:
        print(json.dumps(measure(args.phase, args.sizes, args.repeats, args.mamba_bi)))
        return 0
    phases = ("time-default", "time-tuned") + (() if args.no_memory else ("memory",))
    results = {phase: run_phase(phase, args) for phase in phases}
    text = table(results, args.sizes, args.repeats)
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/sam_encoder.py", **results}, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

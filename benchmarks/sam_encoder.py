#!/usr/bin/env python
"""Image-encoder latency and memory on CPU: RWKV-SAM small vs the same-scale attention backbone vs
SAM ViT-B, batch 1, random weights, measured side by side (interleaved) in one run.

    python benchmarks/sam_encoder.py                  # 512, 1024 and 2048 px
    python benchmarks/sam_encoder.py --sizes 512 1024 --repeats 3

SAM ViT-B comes from the `segment-anything` package (an optional peer: `pip install --no-deps
segment-anything`); its package imports torchvision, which linmix does not need, so small stand-in
modules are placed in sys.modules before importing it. It is skipped when not installed. SAM's ViT
has a fixed 1024 input (absolute position embeddings), so it runs at 1024 only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.utils.memory import peak_memory_mib, pin_malloc_threshold


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    pin_malloc_threshold()
    torch.manual_seed(0)
    models = {
        "RWKV-SAM small": RwkvSamImageEncoder("small", "rwkv").eval(),
        "attention small": RwkvSamImageEncoder("small", "attention").eval(),
    }
    vit = sam_vit_b()
    if vit is not None:
        models["SAM ViT-B"] = vit
    else:
        print("segment-anything not installed: skipping SAM ViT-B", file=sys.stderr)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items()), flush=True)
    rows = []
    for size in args.sizes:
        image = torch.randn(1, 3, size, size)
        competitors = {name: m for name, m in models.items() if name != "SAM ViT-B" or size == 1024}
        times = {name: [] for name in competitors}
        memory = {}
        with torch.no_grad():
            for name, model in competitors.items():  # warm-up call doubles as the memory measurement
                _, memory[name] = peak_memory_mib(lambda: model(image))
            for _ in range(args.repeats):
                for name, model in competitors.items():
                    start = time.perf_counter()
                    model(image)
                    times[name].append(time.perf_counter() - start)
        row = {"size": size, **{name: {"seconds": statistics.median(t), "peak_mib": memory[name]} for name, t in times.items()}}
        rows.append(row)
        print(f"  {size} px: " + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in row.items() if k != "size"), flush=True)
    lines = [f"batch 1, random weights, {torch.get_num_threads()} threads, median of {args.repeats}; parameters: "
             + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items()), "",
             "| image | RWKV-SAM small | attention small | SAM ViT-B | attention / RWKV | ViT-B / RWKV | peak: RWKV | attention | ViT-B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def get(name, key):
            return row[name][key] if name in row else None

        def fmt_s(v):
            return "—" if v is None else f"{v:.2f} s"

        def fmt_m(v):
            return "—" if v is None else f"{v:.0f} MiB"

        def ratio(name):
            return "—" if name not in row else f"**{row[name]['seconds'] / row['RWKV-SAM small']['seconds']:.2f}x**"

        lines.append(f"| {row['size']} px | {fmt_s(get('RWKV-SAM small', 'seconds'))} | {fmt_s(get('attention small', 'seconds'))} | "
                     f"{fmt_s(get('SAM ViT-B', 'seconds'))} | {ratio('attention small')} | {ratio('SAM ViT-B')} | "
                     f"{fmt_m(get('RWKV-SAM small', 'peak_mib'))} | {fmt_m(get('attention small', 'peak_mib'))} | "
                     f"{fmt_m(get('SAM ViT-B', 'peak_mib'))} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/sam_encoder.py", "parameters": params, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

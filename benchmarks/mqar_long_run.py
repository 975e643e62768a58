"""Train chosen models of an MQAR preset for longer than the preset does, at one learning rate,
to see whether their accuracy curves have really flattened (docs/mqar.md, "Longer runs").

    python benchmarks/mqar_long_run.py --preset cpu --models based_d64_f16,mamba_d64_n16 \
        --lr 3e-3 --epochs 42 --out docs/mqar/long_runs.jsonl

Same data stream (fresh examples every epoch), model, optimizer and schedule as the sweep; only the
number of epochs differs (the cosine schedule stretches over all of them). One JSON line per model
with its learning curve, appended to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from linmix.mqar.presets import get_preset
from linmix.mqar.sweep import train_and_evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--models", required=True, help="comma-separated model names of the preset")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    preset = dataclasses.replace(preset, epochs=args.epochs)
    by_name = {config.name: config for config in preset.models}
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; the {args.preset} preset has {sorted(by_name)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        record = train_and_evaluate(by_name[name], preset, args.lr)
        record.update(preset=args.preset, epochs_planned=args.epochs)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        curve = ", ".join(f"{point['mean_accuracy']:.3f}" for point in record["curve"])
        print(f"{name} lr {args.lr:g}, {record['epochs']} epochs ({record['steps']} steps, "
              f"{record['train_seconds']:.0f} s): mean accuracy {record['mean_accuracy']:.3f}; curve {curve}", flush=True)


if __name__ == "__main__":
    main()

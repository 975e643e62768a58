"""How long a sweep will take, estimated from a few timed training steps of each model.

    python -m linmix.mqar.budget --preset cpu --workers 2

times ``steps`` optimizer steps of every model on each training segment's shape and one full test
evaluation (single thread, as the sweep runs), then adds up what the preset asks for: every learning
rate, every epoch's batches and evaluations. Early stops only shorten it, so this is an upper
bound for the machine it was measured on (its load at that moment included); ``--slowdown``
scales it for a busier machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from linmix.mqar.data import generate_mqar
from linmix.mqar.models import MQARModel, masked_recall_loss
from linmix.mqar.presets import MQARPreset, get_preset
from linmix.mqar.sweep import build_optimizer, evaluate

__all__ = ["estimate_sweep_seconds", "time_model"]


def time_model(config, preset: MQARPreset, *, steps: int = 4) -> dict:
    """Seconds per optimizer step on each training segment (after one warm-up step) and of one
    evaluation of all test segments: ``{"step_seconds": {segment name: s}, "eval_seconds": s}``."""
    torch.manual_seed(preset.model_seed)
    model = MQARModel(config, preset.vocab_size, preset.max_seq_len)
    optimizer = build_optimizer(model, 1e-3, preset.weight_decay)
    step_seconds = {}
    for segment in preset.train_segments:
        inputs, labels = generate_mqar(preset.vocab_size, segment.seq_len, segment.num_kv_pairs,
                                       preset.train_batch_size * (steps + 1), seed=0, power_a=preset.power_a)
        for index in range(steps + 1):
            if index == 1:
                started = time.perf_counter()
            rows = slice(index * preset.train_batch_size, (index + 1) * preset.train_batch_size)
            loss, _, _ = masked_recall_loss(model, inputs[rows], labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        step_seconds[segment.name] = (time.perf_counter() - started) / steps
    test = [generate_mqar(preset.vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, seed=1, power_a=preset.power_a)
            for s in preset.test_segments]
    started = time.perf_counter()
    evaluate(model, test, preset.test_batch_size)
    return {"step_seconds": step_seconds, "eval_seconds": time.perf_counter() - started}


def estimate_sweep_seconds(preset: MQARPreset, timings: dict[str, dict], *, workers: int = 2, slowdown: float = 1.0) -> dict:
    """Upper-bound seconds of the whole sweep from :func:`time_model` timings per model name.

    Per model: learning rates x epochs x (each segment's batches x its step time + one evaluation).
    Wall time with ``workers`` processes: the total over workers, but no less than the slowest model
    (one model's learning rates run in one process). Returns per-model seconds, the total CPU
    seconds and the wall estimate, all times ``slowdown``.
    """
    per_model = {}
    for config in preset.models:
        timing = timings[config.name]
        epoch = sum(math.ceil(s.num_examples / preset.train_batch_size) * timing["step_seconds"][s.name]
                    for s in preset.train_segments) + timing["eval_seconds"]
        per_model[config.name] = slowdown * len(preset.learning_rates) * preset.epochs * epoch
    total = sum(per_model.values())
    return {"per_model_seconds": per_model, "cpu_seconds": total, "wall_seconds": max(total / workers, max(per_model.values()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model and segment")
    parser.add_argument("--slowdown", type=float, default=1.0, help="scale for a machine busier than the one timed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    timings = {}
    for config in preset.models:
        timings[config.name] = time_model(config, preset, steps=args.steps)
        steps = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in timings[config.name]["step_seconds"].items())
        print(f"{config.name:26s} step: {steps} | eval {timings[config.name]['eval_seconds']:.2f} s", flush=True)
    estimate = estimate_sweep_seconds(preset, timings, workers=args.workers, slowdown=args.slowdown)
    for name, seconds in sorted(estimate["per_model_seconds"].items(), key=lambda item: -item[1]):
        print(f"{name:26s} {seconds / 60:6.1f} min for {len(preset.learning_rates)} learning rates")
    print(f"preset {preset.name!r}: {estimate['cpu_seconds'] / 60:.1f} CPU-minutes, about "
          f"{estimate['wall_seconds'] / 60:.1f} min with {args.workers} workers (an upper bound: early stops shorten it)")


if __name__ == "__main__":
    main()

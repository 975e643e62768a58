#!/usr/bin/env python
"""CPU training step of Mamba models: the native C selective scan (forward + backward) against the
chunked torch scan, side by side in one process.

Each model takes full training steps (forward, backward, AdamW); the two paths alternate step by
step (``LINMIX_FORCE_REFERENCE=1`` selects the torch path), so load from other processes hits both
alike. Printed: the median time per step of each path and their ratio (no thresholds).

- ``mamba-small`` LM (``BasedForCausalLM.from_preset("mamba-small", vocab_size=257)``) on
  ``--lm-batch`` x ``--lm-length`` byte tokens (default 4 x 512);
- the MQAR ``mamba`` model of d_model 64, state 16 (the sweep's ``mamba_d64_n16``) on batch 32 x 64.

    python benchmarks/selective_scan_train.py                 # 1 thread, 5 steps per path
    python benchmarks/selective_scan_train.py --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from linmix.lm import BasedForCausalLM
from linmix.mqar.models import MQARModel, MQARModelConfig
from linmix.mqar.presets import get_preset
from linmix.ops.dispatch import FORCE_REFERENCE_ENV


def _lm_case(batch: int, length: int):
    model = BasedForCausalLM.from_preset("mamba-small", vocab_size=257)
    ids = torch.randint(0, 257, (batch, length))

    def loss():
        return model(ids, labels=ids).loss

    return model, loss


def _mqar_case(batch: int, length: int):
    vocab = get_preset("cpu").vocab_size
    model = MQARModel(MQARModelConfig("mamba", 64, d_state=16), vocab, length)
    ids = torch.randint(0, vocab, (batch, length))
    targets = torch.randint(0, vocab, (batch, length))

    def loss():
        return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())

    return model, loss


def _step_time(model, loss, optimizer) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss().backward()
    optimizer.step()
    return time.perf_counter() - start


def _compare(name: str, model, loss, steps: int, tokens: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = {"native": [], "torch": []}
    for step in range(steps + 1):  # the first round warms both paths up (kernel build, allocator)
        for path in ("native", "torch"):
            if path == "torch":
                os.environ[FORCE_REFERENCE_ENV] = "1"
            else:
                os.environ.pop(FORCE_REFERENCE_ENV, None)
            elapsed = _step_time(model, loss, optimizer)
            if step:
                times[path].append(elapsed)
    os.environ.pop(FORCE_REFERENCE_ENV, None)
    native_s, torch_s = statistics.median(times["native"]), statistics.median(times["torch"])
    print(f"| {name} | {native_s * 1e3:.0f} ms ({tokens / native_s:,.0f} tok/s) | {torch_s * 1e3:.0f} ms "
          f"({tokens / torch_s:,.0f} tok/s) | {torch_s / native_s:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up step each)")
    parser.add_argument("--lm-batch", type=int, default=4)
    parser.add_argument("--lm-length", type=int, default=512)
    parser.add_argument("--skip-lm", action="store_true", help="only the MQAR model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}, median of {args.steps} training steps (forward + backward + AdamW) per path\n")
    print("| model | native scan | torch scan | torch / native |")
    print("|---|---|---|---|")
    _compare("MQAR mamba_d64_n16, 32 x 64", *_mqar_case(32, 64), args.steps, 32 * 64)
    if not args.skip_lm:
        _compare(f"LM mamba-small, {args.lm_batch} x {args.lm_length}", *_lm_case(args.lm_batch, args.lm_length),
                 args.steps, args.lm_batch * args.lm_length)


if __name__ == "__main__":
    main()

"""benchmarks/sam_encoder.py runs end to end at a tiny size and renders its table."""

import os

import torch

from helpers import load_benchmark
from linmix.ops.dispatch import FORCE_REFERENCE_ENV


def test_measure_and_table_at_a_tiny_size(monkeypatch):
    bench = load_benchmark("sam_encoder")
    monkeypatch.setattr(bench, "sam_vit_b", lambda: None)  # the optional peer is not part of this check
    timing = bench.measure("time-default", [32], 1)
    assert set(timing["rows"][32]) == {"RWKV-SAM small", bench.TORCH_OPS, "attention small", bench.MAMBA}
    assert all(t > 0 for t in timing["rows"][32].values())
    memory = bench.measure("memory", [32], 1)
    results = {"time-default": timing, "time-tuned": timing, "memory": memory}
    results = {k: {**v, "rows": {str(s): r for s, r in v["rows"].items()}} for k, v in results.items()}
    text = bench.table(results, [32], 1)
    assert "| 32 px | default |" in text and "attention / RWKV (torch ops)" in text
    assert bench.TORCH_OPS not in text.splitlines()[0]  # same weights: not listed among the parameter counts
    assert "| Mamba small / RWKV | Mamba small / attention |" in text


def test_torch_ops_wrapper_switches_the_kernels_off_only_during_the_call(monkeypatch):
    bench = load_benchmark("sam_encoder")
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(os.environ.get(FORCE_REFERENCE_ENV))
            return x

    bench.TorchOpsOnly(Probe())(torch.zeros(1))
    assert seen == ["1"] and FORCE_REFERENCE_ENV not in os.environ

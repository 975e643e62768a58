"""The CUDA dispatch to flash-linear-attention: scale and layout are always passed explicitly."""

import importlib
import os

import pytest
import torch

from helpers import assert_close_rms
from linmix.ops import linear_attention_reference

# linmix.ops re-exports the function under the module's name, so fetch the module itself.
la = importlib.import_module("linmix.ops.linear_attention")


def test_fla_call_passes_scale_and_layout(monkeypatch):
    calls = {}

    def fake_parallel_based(q, k, v, scale=None, use_norm=True, head_first=True):
        calls.update(shape=tuple(q.shape), scale=scale, use_norm=use_norm, head_first=head_first)
        return torch.zeros_like(v)

    monkeypatch.setattr(la, "_fla_parallel_based", lambda: fake_parallel_based)
    q, k = torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)
    v = torch.randn(2, 7, 3, 8)
    la._try_fla(q, k, v)
    assert calls == {"shape": (2, 7, 3, 16), "scale": 16 ** -0.5, "use_norm": True, "head_first": False}


def test_fla_call_without_head_first_parameter(monkeypatch):
    """Newer fla versions dropped head_first (layout is always [B, T, H, D]): do not pass it."""
    seen = {}

    def fake_parallel_based(q, k, v, scale=None, use_norm=True):
        seen["scale"] = scale
        return torch.zeros_like(v)

    monkeypatch.setattr(la, "_fla_parallel_based", lambda: fake_parallel_based)
    la._try_fla(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 4))
    assert seen["scale"] == 0.25


def test_cpu_tensors_never_dispatch(monkeypatch):
    monkeypatch.setattr(la, "_fla_parallel_based", lambda: pytest.fail("dispatched a CPU tensor"))
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 4)
    la.linear_attention(q, k, v)


@pytest.mark.slow
def test_fla_parallel_based_under_triton_interpreter():
    """fla's kernel, run on CPU by the Triton interpreter, equals our reference with our call."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("fla")
    if la._fla_parallel_based() is None:
        pytest.skip("fla.ops.based is not importable here")
    q, k = torch.randn(1, 64, 2, 16) * 0.5, torch.randn(1, 64, 2, 16) * 0.5
    v = torch.randn(1, 64, 2, 16)
    out = la._try_fla(q, k, v)
    assert_close_rms(out, linear_attention_reference(q.double(), k.double(), v.double()), 1e-4)

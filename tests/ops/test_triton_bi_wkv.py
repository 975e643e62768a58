"""The Triton Bi-WKV kernel equals the fp64 quadratic oracle, forward and (through its torch backward)
gradients. On machines without a GPU it runs under Triton's interpreter (set before import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import TOLERANCE, assert_close_rms  # noqa: E402
from linmix.ops import bi_wkv, bi_wkv_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, length, channels, w_scale=1.0, dtype=torch.float32):
    w = torch.randn(channels, device=DEVICE) * w_scale / length  # the Vision-RWKV block passes w / T
    u = torch.randn(channels, device=DEVICE) / length
    k = (torch.randn(batch, length, channels, device=DEVICE) * 2).to(dtype)
    v = torch.randn(batch, length, channels, device=DEVICE).to(dtype)
    return w, u, k, v


@pytest.mark.parametrize("batch, length, channels, chunk_size", [(2, 13, 20, 4), (1, 1, 5, 64), (1, 9, 16, 64), (1, 10, 8, 5)])
def test_forward_equals_oracle_fp32(batch, length, channels, chunk_size):
    """One chunk (the two sweeps alone) and several, the last one short (chunk summaries, the states
    carried between chunks, and the per-chunk sweeps from them)."""
    w, u, k, v = _inputs(batch, length, channels)
    actual = bi_wkv(w, u, k, v, backend="triton", chunk_size=chunk_size)
    assert_close_rms(actual, bi_wkv_reference(w, u, k, v), TOLERANCE[torch.float32])


def test_forward_bf16_keeps_dtype():
    w, u, k, v = _inputs(1, 11, 24, dtype=torch.bfloat16)
    y = bi_wkv(w, u, k, v, backend="triton", chunk_size=4)
    assert y.dtype == torch.bfloat16
    assert_close_rms(y, bi_wkv_reference(w, u, k.double(), v.double()), TOLERANCE[torch.bfloat16])


def test_large_decay_and_masked_keys_stay_finite():
    """The max-tracked sweeps are exact for any w (here |w| up to ~100 per token), and -inf keys
    (padded tokens) contribute nothing; a row with no key at all gives 0, never NaN."""
    w, u, k, v = _inputs(2, 12, 9, w_scale=1200.0)
    k[0, 3:7] = float("-inf")
    k[1] = float("-inf")  # a whole row without keys
    y = bi_wkv(w, u, k, v, backend="triton", chunk_size=5)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert_close_rms(y, bi_wkv_reference(w, u, k, v), 1e-5)


def test_gradients_equal_oracle_gradients():
    w, u, k, v = (t.detach().requires_grad_() for t in _inputs(1, 10, 12))
    y = bi_wkv(w, u, k, v, backend="triton", chunk_size=4)
    upstream = torch.randn_like(y)
    actual = torch.autograd.grad(y, (w, u, k, v), upstream)
    expected = torch.autograd.grad(bi_wkv_reference(w, u, k, v), (w, u, k, v), upstream)
    for name, a, e in zip("wukv", actual, expected):
        assert_close_rms(a, e, 1e-4, f"grad {name}")


def test_backend_choices():
    w, u, k, v = _inputs(1, 4, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        bi_wkv(w, u, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' needs"):
        bi_wkv(w.double(), u.double(), k.double(), v.double(), backend="triton")
    if not k.is_cuda:  # auto on CPU never picks Triton (it picks the native C kernel, same values)
        torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv(w, u, k, v, backend="torch"), rtol=1e-5, atol=1e-6)

"""Bi-WKV's one-shift form (the fast path for Vision-RWKV decays) against the fp64 oracle."""

import pytest
import torch

from helpers import assert_close_rms
from linmix.ops.wkv import bi_wkv_reference
from linmix.ops.wkv_one_shift import MAX_SEQUENCE_DECAY, bi_wkv_one_shift, one_shift_applicable

SPEC_DECAYS = [-5.0, 0.0, 3.0, 20.0]  # raw decays; Vision-RWKV passes w / T


def _double(*tensors):
    return [t.detach().double() for t in tensors]


def _inputs(length, batch=2, channels=7, *, key_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    extra = channels - len(SPEC_DECAYS)
    w = torch.tensor(SPEC_DECAYS + (3 * torch.randn(extra, generator=generator)).tolist()) / length
    u = 2 * torch.randn(channels, generator=generator) / length
    k = key_scale * torch.randn(batch, length, channels, generator=generator)
    v = torch.randn(batch, length, channels, generator=generator)
    return w, u, k, v


@pytest.mark.parametrize("length", [1, 2, 15, 64, 1024, 4096])
@pytest.mark.parametrize("block_size", [8, 64])
def test_matches_reference_fp32(length, block_size):
    w, u, k, v = _inputs(length, batch=1 if length > 1024 else 2, channels=5 if length > 1024 else 7)
    assert one_shift_applicable(w, u, length)
    y = bi_wkv_one_shift(w, u, k, v, block_size=block_size)
    assert y.shape == k.shape and y.dtype == torch.float32
    assert_close_rms(y, bi_wkv_reference(*_double(w, u, k, v)), 2e-6, f"T={length} block={block_size}")


@pytest.mark.parametrize("length", [3, 50, 333])
def test_fp64_is_exact(length):
    w, u, k, v = _double(*_inputs(length, key_scale=4.0))
    assert_close_rms(bi_wkv_one_shift(w, u, k, v, block_size=16), bi_wkv_reference(w, u, k, v), 1e-12, "fp64")


def test_widely_spread_keys_and_a_bonus_far_below_the_decay():
    """Keys spanning e^+-40 and u << w: exclusive sums never subtract a token's own term."""
    length, channels = 300, 4
    w = torch.zeros(channels)
    u = torch.full((channels,), -30.0)
    generator = torch.Generator().manual_seed(1)
    k = 10 * torch.randn(1, length, channels, generator=generator)
    v = torch.randn(1, length, channels, generator=generator)
    assert_close_rms(bi_wkv_one_shift(w, u, k, v), bi_wkv_reference(*_double(w, u, k, v)), 2e-6, "spread keys")


def test_masked_keys_and_all_masked_channels():
    w, u, k, v = _inputs(40, batch=1, channels=5)
    k[:, 5:20] = float("-inf")
    assert_close_rms(bi_wkv_one_shift(w, u, k, v, block_size=8), bi_wkv_reference(*_double(w, u, k, v)), 2e-6, "masked")
    empty = bi_wkv_one_shift(w, u, torch.full_like(k, float("-inf")), v, block_size=8)
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("length", [1, 2, 15, 64])
def test_gradients_match_reference(length):
    inputs = _inputs(length)
    cotangent = torch.randn_like(inputs[2])

    def grads(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        (fn(*leaves) * cotangent.to(leaves[2].dtype)).sum().backward()
        return [t.grad for t in leaves]

    expected = grads(bi_wkv_reference, _double(*inputs))
    for dtype, tolerance in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        actual = grads(lambda *a: bi_wkv_one_shift(*a, block_size=8), [t.to(dtype) for t in inputs])
        for name, a, e in zip("wukv", actual, expected):
            if float(e.abs().max()) == 0.0:  # dy/dw is exactly 0 for T <= 2
                assert float(a.abs().max()) <= tolerance
            else:
                assert_close_rms(a, e, tolerance, f"{dtype} T={length} d/d{name}")


def test_applicability_bounds():
    w = torch.tensor([0.5, -0.1])
    u = torch.tensor([1.0, 2.0])
    assert one_shift_applicable(w, u, length=41)  # 40 * 0.5 = 20
    assert not one_shift_applicable(w, u, length=42)
    assert one_shift_applicable(w * 0 + MAX_SEQUENCE_DECAY / 4095, u, length=4096)
    assert not one_shift_applicable(torch.zeros(2), torch.tensor([0.0, 61.0]), length=10)

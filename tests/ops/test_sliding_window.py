"""Sliding-window attention (reference, blocked fast path, ring-buffer decode) and rotary embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCE, assert_close_rms
from linmix.ops.rotary import apply_rotary, rotary_cos_sin, rotary_dim_for
from linmix.ops.sliding_window import (
    SlidingWindowCache,
    sliding_window_attention,
    sliding_window_attention_reference,
    sliding_window_attention_step,
)


def make_qkv(batch, length, heads, head_dim, dtype=torch.float32, requires_grad=False):
    return [torch.randn(batch, length, heads, head_dim, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def reference_fp64(q, k, v, window, key_padding_mask=None, scale=None):
    """The oracle, run in fp64 on detached copies of the inputs, with input grads."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = sliding_window_attention_reference(q64, k64, v64, window=window, key_padding_mask=key_padding_mask, scale=scale)
    return out, (q64, k64, v64)


def compare_forward_backward(q, k, v, window, tolerance, key_padding_mask=None, block_size=None):
    out = sliding_window_attention(q, k, v, window=window, key_padding_mask=key_padding_mask, block_size=block_size)
    expected, leaves = reference_fp64(q, k, v, window, key_padding_mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_rms(out, expected, tolerance, "output")
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(out.dtype))
    expected.backward(grad_out)
    for name, fast, ref in zip("qkv", (q, k, v), leaves):
        assert torch.isfinite(fast.grad).all(), f"d{name} not finite"
        if ref.grad.abs().max() == 0:  # e.g. dq with a single visible key: softmax is constant
            assert fast.grad.abs().max() <= tolerance, f"d{name} should be 0"
        else:
            assert_close_rms(fast.grad, ref.grad, tolerance, f"d{name}")


# ------------------------------------------------------------------------------------------------
# the reference itself


def test_reference_with_window_beyond_length_is_causal_attention():
    q, k, v = make_qkv(2, 37, 3, 24, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    assert_close_rms(sliding_window_attention_reference(q, k, v, window=37), expected, 1e-12)


def test_reference_window_one_by_hand():
    # window=1: query i sees keys i-1 and i only.
    q, k, v = make_qkv(1, 5, 1, 4, dtype=torch.float64)
    out = sliding_window_attention_reference(q, k, v, window=1)
    scale = 4**-0.5
    for i in range(5):
        keys = range(max(0, i - 1), i + 1)
        scores = torch.stack([(q[0, i, 0] * k[0, j, 0]).sum() * scale for j in keys])
        weights = torch.softmax(scores, dim=0)
        expected = sum(w * v[0, j, 0] for w, j in zip(weights, keys))
        torch.testing.assert_close(out[0, i, 0], expected)


# ------------------------------------------------------------------------------------------------
# fast path vs reference

SHAPES = [
    # (batch, T, H, D, window)
    (2, 1, 3, 24, 1),
    (2, 15, 3, 24, 7),
    (1, 15, 3, 24, 128),  # window larger than T
    (2, 63, 3, 24, 1),
    (1, 63, 3, 24, 7),
    (1, 63, 2, 24, 128),
    (1, 500, 3, 24, 7),
    (1, 500, 2, 24, 128),
    (1, 500, 1, 24, 1000),  # window larger than T
    (1, 2048, 1, 8, 128),
]


@pytest.mark.parametrize("batch,length,heads,head_dim,window", SHAPES)
def test_fast_matches_reference_fp32(batch, length, heads, head_dim, window):
    q, k, v = make_qkv(batch, length, heads, head_dim, requires_grad=True)
    compare_forward_backward(q, k, v, window, TOLERANCE[torch.float32])


@pytest.mark.parametrize("batch,length,heads,head_dim,window", [(2, 15, 3, 24, 7), (1, 63, 3, 24, 128), (1, 500, 2, 24, 7)])
def test_fast_matches_reference_bf16(batch, length, heads, head_dim, window):
    q, k, v = make_qkv(batch, length, heads, head_dim, dtype=torch.bfloat16, requires_grad=True)
    compare_forward_backward(q, k, v, window, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("block_size", [1, 5, 16, 64, 1000])
def test_block_size_does_not_change_the_result(block_size):
    q, k, v = make_qkv(2, 70, 3, 24, requires_grad=True)
    mask = torch.rand(2, 70) > 0.2
    compare_forward_backward(q, k, v, 9, TOLERANCE[torch.float32], key_padding_mask=mask, block_size=block_size)


def test_custom_scale():
    q, k, v = make_qkv(1, 40, 2, 24)
    out = sliding_window_attention(q, k, v, window=6, scale=0.37)
    expected, _ = reference_fp64(q, k, v, 6, scale=0.37)
    assert_close_rms(out, expected, TOLERANCE[torch.float32])
    assert not torch.allclose(out, sliding_window_attention(q, k, v, window=6), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# key padding


@pytest.mark.parametrize("length,window", [(15, 7), (63, 128), (130, 4)])
def test_key_padding_mask_left_and_random(length, window):
    q, k, v = make_qkv(3, length, 3, 24, requires_grad=True)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[0, : length // 3] = False  # left padding
    mask[1] = torch.rand(length) > 0.4  # holes anywhere (some queries then see no key)
    mask[2] = False  # a fully padded row
    compare_forward_backward(q, k, v, window, TOLERANCE[torch.float32], key_padding_mask=mask)


def test_query_with_no_visible_key_returns_zeros():
    q, k, v = make_qkv(1, 20, 2, 8, requires_grad=True)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 5:12] = False  # with window 3, queries 8..11 see only padded keys
    out = sliding_window_attention(q, k, v, window=3, key_padding_mask=mask)
    assert torch.equal(out[0, 8:12], torch.zeros_like(out[0, 8:12]))
    assert out[0, 12:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(sliding_window_attention_reference(q, k, v, window=3, key_padding_mask=mask)[0, 8:12], out[0, 8:12])


def test_padded_keys_are_never_attended():
    q, k, v = make_qkv(2, 30, 2, 8)
    mask = torch.rand(2, 30) > 0.3
    out = sliding_window_attention(q, k, v, window=5, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 1e3 * torch.randn_like(k2[~mask])
    v2[~mask] = 1e3 * torch.randn_like(v2[~mask])
    torch.testing.assert_close(sliding_window_attention(q, k2, v2, window=5, key_padding_mask=mask), out)


# ------------------------------------------------------------------------------------------------
# cache: chunked continuation and step-by-step decode


@pytest.mark.parametrize("window", [1, 7])
@pytest.mark.parametrize("split", [1, 6, 7, 8, 9, 25])
def test_cache_continuation_equals_whole(window, split):
    length = 26
    q, k, v = make_qkv(2, length, 3, 24)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :4] = False
    expected = sliding_window_attention_reference(q, k, v, window=window, key_padding_mask=mask)
    head, cache = sliding_window_attention(
        q[:, :split], k[:, :split], v[:, :split], window=window, key_padding_mask=mask[:, :split], return_cache=True
    )
    saved = cache.clone()
    tail, cache_after = sliding_window_attention(
        q[:, split:], k[:, split:], v[:, split:], window=window, key_padding_mask=mask[:, split:], cache=cache, return_cache=True
    )
    assert_close_rms(torch.cat([head, tail], dim=1), expected, TOLERANCE[torch.float32])
    assert cache_after.seen == length and cache.seen == split
    for field in ("k", "v", "valid"):
        assert torch.equal(getattr(cache, field), getattr(saved, field)), "the input cache must not be modified"


def test_cache_continuation_in_three_chunks_without_mask():
    q, k, v = make_qkv(1, 50, 2, 16)
    expected = sliding_window_attention_reference(q, k, v, window=10)
    cache = SlidingWindowCache.empty(1, 10, 2, 16)
    outputs = []
    for start, end in ((0, 3), (3, 31), (31, 50)):
        out, cache = sliding_window_attention(q[:, start:end], k[:, start:end], v[:, start:end], window=10, cache=cache, return_cache=True)
        outputs.append(out)
    assert_close_rms(torch.cat(outputs, dim=1), expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("window,length", [(1, 6), (4, 4), (4, 5), (4, 6), (7, 30)])
def test_steps_equal_whole_forward(window, length):
    # length > window + 1 crosses the ring-buffer boundary (slots start being overwritten).
    q, k, v = make_qkv(2, length, 3, 24)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, : min(3, length - 1)] = False
    expected = sliding_window_attention_reference(q, k, v, window=window, key_padding_mask=mask)
    cache = SlidingWindowCache.empty(2, window, 3, 24)
    outputs = []
    for t in range(length):
        y, cache = sliding_window_attention_step(cache, q[:, t], k[:, t], v[:, t], token_mask=mask[:, t])
        outputs.append(y)
    assert_close_rms(torch.stack(outputs, dim=1), expected, TOLERANCE[torch.float32])
    # The cache built by stepping equals the one returned by the whole forward.
    _, from_forward = sliding_window_attention(q, k, v, window=window, key_padding_mask=mask, return_cache=True)
    assert from_forward.seen == cache.seen == length
    assert torch.equal(from_forward.valid, cache.valid)
    torch.testing.assert_close(from_forward.k[from_forward.valid], cache.k[cache.valid])
    torch.testing.assert_close(from_forward.v[from_forward.valid], cache.v[cache.valid])


def test_prefill_then_steps_equal_whole_forward():
    q, k, v = make_qkv(1, 40, 2, 16)
    expected = sliding_window_attention_reference(q, k, v, window=6)
    out, cache = sliding_window_attention(q[:, :11], k[:, :11], v[:, :11], window=6, return_cache=True)
    outputs = [out]
    for t in range(11, 40):
        y, cache = sliding_window_attention_step(cache, q[:, t], k[:, t], v[:, t])
        outputs.append(y[:, None])
    assert_close_rms(torch.cat(outputs, dim=1), expected, TOLERANCE[torch.float32])


def test_step_bf16_close_to_fp32():
    q, k, v = make_qkv(1, 20, 2, 16)
    expected = sliding_window_attention_reference(q, k, v, window=5)
    cache = SlidingWindowCache.empty(1, 5, 2, 16, dtype=torch.bfloat16)
    outputs = []
    for t in range(20):
        y, cache = sliding_window_attention_step(cache, *(x[:, t].bfloat16() for x in (q, k, v)))
        assert y.dtype == torch.bfloat16
        outputs.append(y)
    assert_close_rms(torch.stack(outputs, dim=1), expected, TOLERANCE[torch.bfloat16])


def test_ring_buffer_memory_is_constant_and_updated_in_place():
    window = 8
    cache = SlidingWindowCache.empty(2, window, 3, 4)
    empty_bytes = cache.nbytes()
    assert empty_bytes == 2 * (2 * window * 3 * 4 * 4) + 2 * window  # k, v fp32 + valid bool
    pointers = [t.data_ptr() for t in cache.tensors()]
    sizes = {}
    for t in range(3 * window):
        q_t, k_t, v_t = (torch.randn(2, 3, 4) for _ in range(3))
        _, cache = sliding_window_attention_step(cache, q_t, k_t, v_t)
        if t + 1 in (window + 5, 3 * window):
            sizes[t + 1] = cache.nbytes()
    assert sizes[window + 5] == sizes[3 * window] == empty_bytes
    assert [t.data_ptr() for t in cache.tensors()] == pointers
    assert cache.seen == 3 * window and cache.valid.all()


# ------------------------------------------------------------------------------------------------
# validation


def test_bad_inputs_raise_value_errors_naming_the_layout():
    q, k, v = make_qkv(2, 10, 3, 8)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, D\]"):
        sliding_window_attention(q[0], k, v, window=4)
    with pytest.raises(ValueError, match=r"q, k, v must agree in \[B, T, H, D\]"):
        sliding_window_attention(q, k[:, :9], v, window=4)
    with pytest.raises(ValueError, match=r"q, k, v must agree in \[B, T, H, D\]"):
        sliding_window_attention_reference(q, k, v[..., :4], window=4)
    with pytest.raises(ValueError, match=r"floating-point tensor of shape \[B, T, H, D\]"):
        sliding_window_attention(q, k.long(), v, window=4)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        sliding_window_attention_reference(q, k, v, window=-3)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, T\] = \(2, 10\)"):
        sliding_window_attention(q, k, v, window=4, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \[B, T\]"):
        sliding_window_attention(q, k, v, window=4, key_padding_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"cache k, v must have shape \[B, window, H, D\] = \(2, 4, 3, 8\)"):
        sliding_window_attention(q, k, v, window=4, cache=SlidingWindowCache.empty(2, 5, 3, 8))


def test_bad_step_inputs_raise_value_errors():
    cache = SlidingWindowCache.empty(2, 4, 3, 8)
    q_t = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"q_t must have shape \[B, H, D\]"):
        sliding_window_attention_step(cache, q_t[None], q_t, q_t)
    with pytest.raises(ValueError, match=r"must agree in \[B, H, D\]"):
        sliding_window_attention_step(cache, q_t, q_t[:, :2], q_t)
    with pytest.raises(ValueError, match=r"\[B, window, H, D\] = \(1, 4, 3, 8\)"):
        sliding_window_attention_step(cache, q_t[:1], q_t[:1], q_t[:1])
    with pytest.raises(ValueError, match=r"token_mask must be a bool tensor of shape \[B\]"):
        sliding_window_attention_step(cache, q_t, q_t, q_t, token_mask=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# rotary embeddings (rotate-half)


def test_rotary_rotate_half_by_hand():
    # D = 4, rotary_dim = 4: pairs (x0, x2) and (x1, x3) rotate by pos * 1 and pos * 10000^-0.5 = pos / 100.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).repeat(1, 2, 1, 1)
    cos, sin = rotary_cos_sin(torch.tensor([0, 3]), 4)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 0])  # position 0: identity
    a, b = 3.0, 0.03
    expected = torch.tensor(
        [
            1 * math.cos(a) - 3 * math.sin(a),
            2 * math.cos(b) - 4 * math.sin(b),
            3 * math.cos(a) + 1 * math.sin(a),
            4 * math.cos(b) + 2 * math.sin(b),
        ]
    )
    torch.testing.assert_close(out[0, 1, 0], expected)


def test_rotary_partial_leaves_the_rest_untouched():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rotary_cos_sin(torch.arange(5), 4)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[:, 1:, :, :4], x[:, 1:, :, :4])
    assert rotary_dim_for(8, 0.5) == 4 and rotary_dim_for(8, 0.0) == 0


def test_rotary_scores_depend_only_on_relative_position():
    q = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 16, dtype=torch.float64)

    def score(i, j):
        cos_i, sin_i = rotary_cos_sin(torch.tensor([i]), 16, dtype=torch.float64)
        cos_j, sin_j = rotary_cos_sin(torch.tensor([j]), 16, dtype=torch.float64)
        return (apply_rotary(q, cos_i, sin_i) * apply_rotary(k, cos_j, sin_j)).sum(-1)

    for i, j, shift in ((5, 2, 100), (0, 0, 37), (40, 9, 1000)):
        torch.testing.assert_close(score(i, j), score(i + shift, j + shift), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_rotary_batched_positions_and_dtype():
    x = torch.randn(2, 6, 3, 8, dtype=torch.bfloat16)
    positions = torch.stack([torch.arange(6), torch.arange(6) + 4])
    cos, sin = rotary_cos_sin(positions, 8)
    assert cos.shape == (2, 6, 4) and cos.dtype == torch.float32
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    cos1, sin1 = rotary_cos_sin(torch.arange(6) + 4, 8)
    torch.testing.assert_close(out[1:], apply_rotary(x[1:], cos1, sin1))


def test_rotary_bad_inputs():
    with pytest.raises(ValueError, match=r"integer tensor of shape \[T\] or \[B, T\]"):
        rotary_cos_sin(torch.arange(4.0), 8)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rotary_cos_sin(torch.arange(4), 7)
    cos, sin = rotary_cos_sin(torch.arange(4), 8)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, H, D\]"):
        apply_rotary(torch.randn(4, 3, 8), cos, sin)
    with pytest.raises(ValueError, match=r"cos/sin must have shape \[T, r/2\] = \(5, 4\)"):
        apply_rotary(torch.randn(1, 5, 3, 8), cos, sin)
    with pytest.raises(ValueError, match=r"rotary dim 8 exceeds the head dim D = 6"):
        apply_rotary(torch.randn(1, 4, 3, 6), cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        rotary_dim_for(6, 0.5)

import math

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops.feature_maps import taylor_feature_dim, taylor_feature_map
from linmix.ops.linear_attention import (
    LinearAttentionState,
    feature_dim_of,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)


# ---------------------------------------------------------------- feature map
@pytest.mark.parametrize("symmetric, width", [(True, 153), (False, 273)])
def test_taylor_feature_map_gives_taylor_kernel(symmetric, width):
    q = torch.randn(7, 16, dtype=torch.float64)
    k = torch.randn(7, 16, dtype=torch.float64)
    phi_q, phi_k = taylor_feature_map(q, symmetric), taylor_feature_map(k, symmetric)
    assert phi_q.shape == (7, width) == (7, taylor_feature_dim(16, symmetric))
    s = (q * k).sum(-1) / math.sqrt(16)
    torch.testing.assert_close((phi_q * phi_k).sum(-1), 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


def test_taylor_feature_map_layout_and_scales():
    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    f = 2
    phi = taylor_feature_map(x)  # [1, x/f^(1/4), x0^2/sqrt(2f), x0*x1/sqrt(f), x1^2/sqrt(2f)]
    expected = torch.tensor([[1.0, 2 / f**0.25, 3 / f**0.25, 4 / math.sqrt(2 * f), 6 / math.sqrt(f), 9 / math.sqrt(2 * f)]], dtype=torch.float64)
    torch.testing.assert_close(phi, expected)


def test_taylor_input_dim_equals_prescaled_input():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    scaled = taylor_feature_map(x * (8 / 32) ** 0.25)
    torch.testing.assert_close(taylor_feature_map(x, input_dim=32), scaled)


def test_symmetric_and_full_maps_agree_through_attention():
    q, k, v = (torch.randn(2, 20, 3, 6, dtype=torch.float64) for _ in range(3))
    a = linear_attention(q, k, v, feature_map="taylor")
    b = linear_attention(q, k, v, feature_map="taylor_full")
    torch.testing.assert_close(a, b)


def test_feature_map_rejects_integer_input():
    with pytest.raises(ValueError, match=r"floating-point"):
        taylor_feature_map(torch.ones(3, 4, dtype=torch.long))


# ---------------------------------------------------------------- chunked vs reference
SHAPES = [  # (B, T, H, f, Dv, chunk)
    (2, 1, 3, 16, 24, 64),
    (1, 15, 5, 16, 20, 4),
    (2, 63, 3, 6, 10, 16),
    (1, 500, 2, 16, 12, 64),
    (1, 2048, 1, 8, 16, 128),
]


def _inputs(batch, length, heads, f, value_dim, dtype=torch.float32, requires_grad=False):
    q = (torch.randn(batch, length, heads, f) * 0.5).to(dtype).requires_grad_(requires_grad)
    k = (torch.randn(batch, length, heads, f) * 0.5).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(batch, length, heads, value_dim).to(dtype).requires_grad_(requires_grad)
    return q, k, v


def _reference64(q, k, v, **kwargs):
    return linear_attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), **kwargs)


@pytest.mark.parametrize("batch, length, heads, f, value_dim, chunk", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_matches_reference_fp32(batch, length, heads, f, value_dim, chunk, causal):
    q, k, v = _inputs(batch, length, heads, f, value_dim)
    out = linear_attention(q, k, v, causal=causal, chunk_size=chunk)
    assert out.shape == (batch, length, heads, value_dim) and out.dtype == torch.float32
    assert_close_rms(out, _reference64(q, k, v, causal=causal), TOLERANCE[torch.float32])


@pytest.mark.parametrize("batch, length, heads, f, value_dim, chunk", SHAPES[:4])
def test_chunked_matches_reference_bf16(batch, length, heads, f, value_dim, chunk):
    q, k, v = _inputs(batch, length, heads, f, value_dim, dtype=torch.bfloat16)
    out = linear_attention(q, k, v, chunk_size=chunk)
    assert out.dtype == torch.bfloat16
    assert_close_rms(out, _reference64(q, k, v), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, chunk", [(15, 4), (63, 16), (130, 64)])
def test_chunked_gradients_match_reference(length, chunk, dtype):
    q, k, v = _inputs(2, length, 3, 6, 10, dtype=dtype, requires_grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    grad_out = torch.randn(2, length, 3, 10, dtype=torch.float64)
    (linear_attention(q, k, v, chunk_size=chunk).double() * grad_out).sum().backward()
    (linear_attention_reference(q64, k64, v64) * grad_out).sum().backward()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, ours, ref in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert_close_rms(ours.grad, ref.grad, tolerance, f"grad {name}")


def test_custom_feature_map_callable():
    def elu_plus_one(x):
        return torch.nn.functional.elu(x) + 1

    q, k, v = _inputs(2, 37, 2, 5, 7)
    out = linear_attention(q, k, v, feature_map=elu_plus_one, chunk_size=8)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), feature_map=elu_plus_one)
    assert_close_rms(out, ref, TOLERANCE[torch.float32])
    assert feature_dim_of(elu_plus_one, 5) == 5


def test_key_padding_mask_keeps_padded_keys_out():
    q, k, v = _inputs(2, 40, 3, 8, 6)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :9] = False  # left padding on row 0
    mask[1, 17] = False  # a hole anywhere
    out = linear_attention(q, k, v, key_padding_mask=mask, chunk_size=16)
    ref = _reference64(q, k, v, key_padding_mask=mask)
    assert_close_rms(out, ref, TOLERANCE[torch.float32])
    # row 0 after its padding equals the unpadded row alone
    alone = linear_attention(q[:1, 9:], k[:1, 9:], v[:1, 9:])
    assert_close_rms(out[:1, 9:], alone, TOLERANCE[torch.float32])


# ---------------------------------------------------------------- recurrence
@pytest.mark.parametrize("length", [1, 15, 63])
def test_steps_equal_whole_sequence(length):
    q, k, v = _inputs(2, length, 3, 16, 10)
    full, final = linear_attention(q, k, v, chunk_size=16, return_final_state=True)
    state = LinearAttentionState.empty(2, 3, taylor_feature_dim(16), 10)
    outputs = []
    for t in range(length):
        y_t, state = linear_attention_step(state, q[:, t], k[:, t], v[:, t])
        outputs.append(y_t)
    assert_close_rms(torch.stack(outputs, dim=1), full, TOLERANCE[torch.float32])
    assert_close_rms(state.kv, final.kv, TOLERANCE[torch.float32])
    assert_close_rms(state.k_sum, final.k_sum, TOLERANCE[torch.float32])
    assert state.kv.shape == (2, 3, 153, 10) and state.k_sum.shape == (2, 3, 153)  # phi(k), not raw k


def test_state_continuation_equals_whole_sequence():
    q, k, v = _inputs(2, 70, 3, 8, 6)
    full = linear_attention(q, k, v, chunk_size=16)
    head, state = linear_attention(q[:, :33], k[:, :33], v[:, :33], chunk_size=16, return_final_state=True)
    tail = linear_attention(q[:, 33:], k[:, 33:], v[:, 33:], chunk_size=16, initial_state=state)
    assert_close_rms(torch.cat([head, tail], dim=1), full, TOLERANCE[torch.float32])


def test_bf16_steps_accumulate_in_fp32():
    q, k, v = _inputs(1, 50, 2, 16, 8, dtype=torch.bfloat16)
    state = LinearAttentionState.empty(1, 2, 153, 8)
    for t in range(50):
        y_t, state = linear_attention_step(state, q[:, t], k[:, t], v[:, t])
    assert state.kv.dtype == torch.float32 and y_t.dtype == torch.bfloat16
    assert_close_rms(y_t, _reference64(q, k, v)[:, -1], TOLERANCE[torch.bfloat16])


def test_long_bf16_sequence_does_not_overflow():
    # 64k tokens: the denominator grows like T; fp32 accumulation keeps it finite and exact enough.
    length = 65536
    q, k, v = _inputs(1, length, 1, 16, 4, dtype=torch.bfloat16)
    out, state = linear_attention(q, k, v, chunk_size=256, return_final_state=True)
    assert torch.isfinite(out.float()).all() and torch.isfinite(state.kv).all()
    assert state.k_sum[0, 0, 0].item() == pytest.approx(length, rel=1e-6)  # the constant feature counts tokens
    # the last output equals the explicit formula over all 64k keys
    s = (k[0, :, 0].double() @ q[0, -1, 0].double()) / 4.0
    weights = 1 + s + s * s / 2
    expected = (weights[:, None] * v[0, :, 0].double()).sum(0) / weights.sum()
    assert_close_rms(out[0, -1, 0], expected, TOLERANCE[torch.bfloat16])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 3)), r"\[B, T, H, D\]"),
        (lambda: (torch.randn(2, 5, 3, 4), torch.randn(2, 6, 3, 4), torch.randn(2, 5, 3, 4)), r"\[B, T, H\]"),
        (lambda: (torch.randn(2, 5, 3, 4), torch.randn(2, 5, 2, 4), torch.randn(2, 5, 3, 4)), r"\[B, T, H\]"),
        (lambda: (torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 5), torch.randn(2, 5, 3, 4)), r"feature width"),
        (lambda: (torch.ones(2, 5, 3, 4, dtype=torch.long),) * 3, r"floating-point"),
    ],
)
def test_bad_input_raises_naming_expected_shapes(make, message):
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v)
    with pytest.raises(ValueError, match=message):
        linear_attention_reference(q, k, v)


def test_bad_options_raise():
    q, k, v = _inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="relu")
    with pytest.raises(ValueError, match="causal=True"):
        linear_attention(q, k, v, causal=False, return_final_state=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        linear_attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, backend="fla")  # CPU tensors cannot use the CUDA kernel
    state = LinearAttentionState.empty(1, 1, 15, 4)
    with pytest.raises(ValueError, match=r"\[B, H, D\]"):
        linear_attention_step(state, q[:, 0, 0], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match=r"D' = 15 but the state holds D' = 16"):
        linear_attention_step(LinearAttentionState.empty(1, 1, 16, 4), q[:, 0], k[:, 0], v[:, 0])

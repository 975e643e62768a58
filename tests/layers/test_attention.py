"""SlidingWindowAttention and MultiHeadAttention: the mixer contract, caches, masks, checkpoint names."""

from __future__ import annotations

import copy

import pytest
import torch

from gradient_checks import assert_gradients_match_finite_differences
from helpers import TOLERANCE, assert_close_rms
from mixer_contract import check_left_padding, check_prefix_then_steps, check_state_size_constant, check_steps_equal_forward
from linmix.layers.attention import KVCache, MultiHeadAttention, SlidingWindowAttention
from linmix.ops.sliding_window import SlidingWindowCache

D_MODEL = 48  # 3 heads of 16


def sliding(window=5, rotary_fraction=1.0, **kwargs):
    return SlidingWindowAttention(D_MODEL, num_heads=3, window=window, rotary_fraction=rotary_fraction, **kwargs)


def global_attention(rotary_fraction=1.0, **kwargs):
    return MultiHeadAttention(D_MODEL, num_heads=3, rotary_fraction=rotary_fraction, **kwargs)


# ------------------------------------------------------------------------------------------------
# the mixer contract

LAYERS = {
    "swa-window1": lambda: sliding(window=1),
    "swa-window5": lambda: sliding(window=5),
    "swa-window5-half-rotary-bias": lambda: sliding(window=5, rotary_fraction=0.5, qkv_bias=True, out_bias=True),
    "swa-window64-no-rotary": lambda: sliding(window=64, rotary_fraction=0.0),
    "mha": lambda: global_attention(),
    "mha-half-rotary-bias": lambda: global_attention(rotary_fraction=0.5, qkv_bias=True, out_bias=True),
}


@pytest.mark.parametrize("name", LAYERS)
def test_steps_equal_forward(name):
    check_steps_equal_forward(LAYERS[name](), batch=2, length=20)  # 20 > window + 1: crosses the ring


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("prefix", [1, 7])
def test_prefix_then_steps(name, prefix):
    check_prefix_then_steps(LAYERS[name](), batch=2, length=20, prefix=prefix)


@pytest.mark.parametrize("name", LAYERS)
def test_left_padding(name):
    check_left_padding(LAYERS[name](), length=12, pad=5)


def test_sliding_window_state_size_constant():
    check_state_size_constant(sliding(window=4), steps=20)


def test_state_size_bytes_follow_the_paper():
    assert sliding(window=5).state_size_bytes(10) == sliding(window=5).state_size_bytes(10_000) == 4 * 2 * D_MODEL * 5
    assert SlidingWindowAttention(1024).state_size_bytes(2048) == 4 * 2 * 1024 * 128
    assert global_attention().state_size_bytes(300) == 4 * 2 * D_MODEL * 300


# ------------------------------------------------------------------------------------------------
# sliding-window specifics


def test_sliding_window_with_wide_window_equals_global_attention():
    swa, mha = sliding(window=100), global_attention()
    mha.load_state_dict(swa.state_dict())
    x = torch.randn(2, 30, D_MODEL)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :6] = False
    with torch.no_grad():
        assert_close_rms(swa(x), mha(x), TOLERANCE[torch.float32])
        assert_close_rms(swa(x, attention_mask=mask)[:, 6:], mha(x, attention_mask=mask)[:, 6:], TOLERANCE[torch.float32])


def test_sliding_window_forward_does_not_modify_the_given_state():
    layer = sliding(window=4).eval()
    x = torch.randn(1, 9, D_MODEL)
    with torch.no_grad():
        _, state = layer(x[:, :5], return_state=True)
        saved = state.clone()
        layer(x[:, 5:], state)
        _, new_state = layer(x[:, 5:], state, return_state=True)
    assert torch.equal(state.k, saved.k) and state.seen == saved.seen == 5
    assert isinstance(new_state, SlidingWindowCache) and new_state.seen == 9


def test_sliding_window_steps_are_in_place():
    layer = sliding(window=3).eval()
    state = layer.init_state(2)
    pointer = state.k.data_ptr()
    with torch.no_grad():
        for _ in range(10):
            _, state = layer.step(torch.randn(2, D_MODEL), state)
    assert state.k.data_ptr() == pointer and state.seen == 10


def test_based_checkpoint_names_and_shapes():
    layer = SlidingWindowAttention(1024, num_heads=16, window=128)
    shapes = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    assert shapes == {"Wqkv.weight": (3072, 1024), "out_proj.weight": (1024, 1024)}
    assert layer.head_dim == 64 and layer.rotary_dim == 64
    with_bias = SlidingWindowAttention(64, num_heads=4, qkv_bias=True, out_bias=True)
    assert set(with_bias.state_dict()) == {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}


# ------------------------------------------------------------------------------------------------
# global attention KV cache


def test_kv_cache_capacity_doubles_and_decode_equals_forward():
    layer = global_attention().eval()
    x = torch.randn(2, 19, D_MODEL)
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(2, capacity=2)
        capacities, outputs = [], []
        for t in range(19):
            y, state = layer.step(x[:, t], state)
            outputs.append(y)
            capacities.append(state.capacity)
    assert_close_rms(torch.stack(outputs, dim=1), full, TOLERANCE[torch.float32])
    assert sorted(set(capacities)) == [2, 4, 8, 16, 32]
    assert state.length == 19 and state.valid[:, :19].all() and not state.valid[:, 19:].any()


def test_kv_cache_grows_across_chunked_forward():
    layer = global_attention().eval()
    x = torch.randn(1, 45, D_MODEL)
    with torch.no_grad():
        full = layer(x)
        head, state = layer(x[:, :3], return_state=True)
        assert isinstance(state, KVCache) and state.capacity == 4 and state.length == 3
        middle, state = layer(x[:, 3:20], state, return_state=True)
        assert state.capacity == 32 and state.length == 20
        saved = state.clone()
        tail = layer(x[:, 20:], state)  # no return_state: the cache stays as it was
        assert state.length == 20 and torch.equal(state.k, saved.k)
    assert_close_rms(torch.cat([head, middle, tail], dim=1), full, TOLERANCE[torch.float32])


def test_kv_cache_reserve_keeps_contents():
    cache = KVCache.empty(1, 2, 4, capacity=3)
    k = torch.randn(1, 2, 3, 4)
    cache.append(k, k + 1, torch.tensor([[False, True, True]]))
    cache.reserve(7)
    assert cache.capacity == 12 and cache.length == 3
    assert torch.equal(cache.k[:, :, :3], k) and torch.equal(cache.v[:, :, :3], k + 1)
    assert cache.valid.tolist() == [[False, True, True] + [False] * 9]


# ------------------------------------------------------------------------------------------------
# masks, gradients, dtypes


@pytest.mark.parametrize("make", [lambda: sliding(window=4), global_attention], ids=["swa", "mha"])
def test_padding_gives_finite_outputs_and_gradients(make):
    layer = make()
    x = torch.randn(2, 10, D_MODEL, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :7] = False
    y = layer(x, attention_mask=mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # Real tokens never read the padding: their outputs carry no gradient to the padded inputs.
    layer.zero_grad()
    x_real = x.detach().clone().requires_grad_()
    layer(x_real, attention_mask=mask)[0, 7:].sum().backward()
    assert torch.equal(x_real.grad[0, :7], torch.zeros_like(x_real.grad[0, :7]))
    assert x_real.grad[0, 7:].abs().amax(-1).gt(0).all()
    # The gradients are the loss's derivatives: fp32 autograd against fp64 finite differences.
    assert_gradients_match_finite_differences(layer, lambda module, inputs: module(inputs, attention_mask=mask).sum(), x.detach())


@pytest.mark.parametrize("make", [lambda: sliding(window=4), global_attention], ids=["swa", "mha"])
def test_bf16_close_to_fp32(make):
    layer = make().eval()
    layer_bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 20, D_MODEL)
    with torch.no_grad():
        expected = layer(x)
        y = layer_bf16(x.bfloat16())
        state = layer_bf16.init_state(2)
        assert state.k.dtype == torch.bfloat16
        y_step, _ = layer_bf16.step(x[:, 0].bfloat16(), state)
    assert y.dtype == torch.bfloat16
    assert_close_rms(y, expected, TOLERANCE[torch.bfloat16])
    assert_close_rms(y_step, expected[:, 0], TOLERANCE[torch.bfloat16])


def test_integer_attention_mask_is_accepted():
    layer = sliding(window=4).eval()
    x = torch.randn(1, 8, D_MODEL)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(layer(x, attention_mask=mask), layer(x, attention_mask=mask.bool()))


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("make", [lambda: sliding(window=4), global_attention], ids=["swa", "mha"])
def test_bad_inputs_raise_value_errors(make):
    layer = make()
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 48\]"):
        layer(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor of shape \[B, T, 48\]"):
        layer(torch.ones(2, 5, 48, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 48\]"):
        layer.step(torch.randn(2, 1, 48), layer.init_state(2))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(2, 5\)"):
        layer(torch.randn(2, 5, 48), attention_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="state must be a"):
        layer(torch.randn(2, 5, 48), state=object())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"d_model \(50\) must be divisible by num_heads \(3\)"):
        SlidingWindowAttention(50, num_heads=3)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        SlidingWindowAttention(48, num_heads=3, window=0)
    with pytest.raises(ValueError, match="rotary fraction must lie in"):
        MultiHeadAttention(48, num_heads=3, rotary_fraction=1.5)
    with pytest.raises(ValueError, match=r"state k, v must have shape \[B, H, capacity, D\]"):
        global_attention().step(torch.randn(2, 48), KVCache.empty(3, 3, 16))


def test_kv_cache_tracks_padding_so_unpadded_decoding_needs_no_mask():
    layer = MultiHeadAttention(d_model=16, num_heads=2)
    x = torch.randn(2, 6, 16)
    _, state = layer(x, return_state=True)
    assert not state.padded  # decode steps run SDPA without a mask (flash kernel on GPU)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    _, padded_state = layer(x, attention_mask=mask, return_state=True)
    assert padded_state.padded
    step_input = torch.randn(2, 16)
    y_padded, _ = layer.step(step_input, padded_state)
    y_trimmed, _ = layer.step(step_input[1:], layer(x[1:], return_state=True)[1])
    torch.testing.assert_close(y_padded[1:], y_trimmed)  # the unpadded row is unaffected by the mask

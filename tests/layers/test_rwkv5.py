"""RWKV5TimeMix: chunked recurrence vs the token-by-token reference, and the causal mixer contract."""

import pytest
import torch

from gradient_checks import assert_gradients_match_finite_differences
from helpers import TOLERANCE, assert_close_rms
from mixer_contract import check_left_padding, check_prefix_then_steps, check_state_size_constant, check_steps_equal_forward
from linmix.layers.rwkv5 import RWKV5TimeMix, rwkv5_recurrence, rwkv5_recurrence_reference

LAYERS = {
    "one_head": lambda: RWKV5TimeMix(16, chunk_size=8),
    "four_heads_small_chunks": lambda: RWKV5TimeMix(24, num_heads=4, layer_id=1, num_layers=2, chunk_size=5),
}


@pytest.mark.parametrize("length, chunk", [(1, 4), (15, 4), (37, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_reference(length, chunk, dtype):
    batch, heads, size = 2, 3, 5
    r, k, v = (torch.randn(batch, length, heads, size, dtype=dtype) for _ in range(3))
    log_decay = -torch.rand(batch, length, heads, size, dtype=dtype) * 3  # per position, as with padding
    log_decay[:, ::4] = 0.0
    bonus = torch.randn(heads, size, dtype=dtype)
    state = torch.randn(batch, heads, size, size, dtype=dtype)
    y_ref, s_ref = rwkv5_recurrence_reference(r, k, v, log_decay, bonus, state)
    y, s = rwkv5_recurrence(r, k, v, log_decay, bonus, state, chunk_size=chunk)
    assert_close_rms(y, y_ref, TOLERANCE[dtype], "chunked output")
    assert_close_rms(s, s_ref, TOLERANCE[dtype], "chunked final state")


def test_reference_by_hand_one_channel():
    """H = K = 1: y_t = r_t (u k_t v_t + S_{t-1}), S_t = w S_{t-1} + k_t v_t."""
    r = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    k = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    v = torch.tensor([2.0, 5.0]).view(1, 2, 1, 1)
    log_decay = torch.full((1, 2, 1, 1), torch.log(torch.tensor(0.5)).item())
    bonus = torch.tensor([[0.1]])
    y, s = rwkv5_recurrence_reference(r, k, v, log_decay, bonus, torch.zeros(1, 1, 1, 1))
    # t0: y = 1 * (0.1 * 6 + 0) = 0.6; S = 6.  t1: y = 2 * (0.1 * 5 + 6) = 13; S = 0.5 * 6 + 5 = 8
    torch.testing.assert_close(y.flatten(), torch.tensor([0.6, 13.0]))
    torch.testing.assert_close(s.flatten(), torch.tensor([8.0]))


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("length", [1, 15, 37])
def test_steps_equal_forward(name, length):
    check_steps_equal_forward(LAYERS[name](), batch=2, length=length)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_prefix_then_steps(name):
    check_prefix_then_steps(LAYERS[name](), batch=2, length=30, prefix=17)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_left_padding(name):
    check_left_padding(LAYERS[name]())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_size_constant(name):
    check_state_size_constant(LAYERS[name]())


def test_state_size_is_the_matrix_valued_accounting():
    assert RWKV5TimeMix(64, num_heads=4).state_size_bytes(1024) == 4 * 4 * 16 * 16
    assert RWKV5TimeMix(64).state_size_bytes(10) == 4 * 64 * 64


def test_backward_is_finite_and_errors_are_clear():
    layer = RWKV5TimeMix(12, num_heads=3, chunk_size=4)
    x = torch.randn(2, 11, 12, requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # The gradients are the loss's derivatives: fp32 autograd against fp64 finite differences.
    assert_gradients_match_finite_differences(layer, lambda module, inputs: module(inputs).square().mean(), x.detach())
    with pytest.raises(ValueError, match="divisible"):
        RWKV5TimeMix(10, num_heads=3)
    with pytest.raises(ValueError, match="RWKV5State"):
        layer.step(torch.randn(2, 12), layer.init_state(3))

"""The RWKV-5 recurrence (linmix.ops.rwkv5): the chunked form against the token-by-token oracle on odd
shapes, fp64 / fp32 tight and bf16 loose, gradients, a hand-worked case and input errors."""

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops import rwkv5_recurrence, rwkv5_recurrence_reference, rwkv5_recurrence_step


def _inputs(batch, length, heads, key_dim, value_dim=None, *, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value_dim = key_dim if value_dim is None else value_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    r, k = randn(batch, length, heads, key_dim), randn(batch, length, heads, key_dim)
    v = randn(batch, length, heads, value_dim)
    log_decay = -(torch.rand(batch, length, heads, key_dim, generator=generator, dtype=torch.float64) * 3).to(dtype)
    log_decay[:, ::4] = 0.0  # decay 1, as the layer gives padded tokens
    bonus = randn(heads, key_dim)
    state = randn(batch, heads, key_dim, value_dim)
    return r, k, v, log_decay, bonus, state


@pytest.mark.parametrize("length, chunk", [(1, 4), (15, 4), (37, 8), (16, 16), (5, 64), (63, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_reference(length, chunk, dtype):
    inputs = _inputs(2, length, 3, 5, dtype=dtype)
    y_ref, s_ref = rwkv5_recurrence_reference(*inputs)
    y, s = rwkv5_recurrence(*inputs, chunk_size=chunk)
    assert y.dtype == s.dtype == dtype and y.shape == (2, length, 3, 5)
    assert_close_rms(y, y_ref, TOLERANCE[dtype], "chunked output")
    assert_close_rms(s, s_ref, TOLERANCE[dtype], "chunked final state")


@pytest.mark.parametrize("batch, length, heads, key_dim, value_dim", [(1, 13, 1, 1, 1), (3, 21, 2, 3, 7), (1, 9, 4, 6, 2)])
def test_odd_shapes_and_a_value_dim_unlike_the_key_dim(batch, length, heads, key_dim, value_dim):
    inputs = _inputs(batch, length, heads, key_dim, value_dim)
    y_ref, s_ref = rwkv5_recurrence_reference(*inputs)
    y, s = rwkv5_recurrence(*inputs, chunk_size=5)
    assert y.shape == (batch, length, heads, value_dim) and s.shape == (batch, heads, key_dim, value_dim)
    assert_close_rms(y, y_ref, TOLERANCE[torch.float64], "output")
    assert_close_rms(s, s_ref, TOLERANCE[torch.float64], "state")


def test_bf16_inputs_with_an_fp32_state_are_close_to_the_fp64_oracle():
    r, k, v, log_decay, bonus, state = _inputs(2, 33, 2, 8)
    low = [t.bfloat16() for t in (r, k, v, log_decay, bonus)]
    y, s = rwkv5_recurrence(*low, state.float(), chunk_size=8)
    y_ref, s_ref = rwkv5_recurrence_reference(r, k, v, log_decay, bonus, state)
    assert y.dtype == torch.float32  # computed and returned in the state's dtype
    assert_close_rms(y, y_ref, TOLERANCE[torch.bfloat16], "bf16 output")
    assert_close_rms(s, s_ref, TOLERANCE[torch.bfloat16], "bf16 state")


def test_gradients_of_the_chunked_form_equal_the_reference():
    inputs = [t.requires_grad_() for t in _inputs(2, 19, 2, 3)]
    y, s = rwkv5_recurrence(*inputs, chunk_size=6)
    weight_y, weight_s = torch.randn_like(y), torch.randn_like(s)
    grads = torch.autograd.grad((y * weight_y).sum() + (s * weight_s).sum(), inputs)
    y_ref, s_ref = rwkv5_recurrence_reference(*inputs)
    grads_ref = torch.autograd.grad((y_ref * weight_y).sum() + (s_ref * weight_s).sum(), inputs)
    for name, grad, expected in zip(("r", "k", "v", "log_decay", "bonus", "state"), grads, grads_ref):
        assert_close_rms(grad, expected, 1e-9, f"d/d{name}")


def test_gradcheck_on_a_small_case():
    inputs = [t.requires_grad_() for t in _inputs(1, 7, 1, 2, 3)]
    assert torch.autograd.gradcheck(lambda *args: rwkv5_recurrence(*args, chunk_size=3), inputs)


def test_steps_continue_the_chunked_form():
    """A chunked prefix, then one step per token, equals the chunked form over the whole sequence."""
    r, k, v, log_decay, bonus, state = _inputs(2, 17, 3, 4, 5)
    y_all, s_all = rwkv5_recurrence(r, k, v, log_decay, bonus, state, chunk_size=4)
    y_prefix, s = rwkv5_recurrence(r[:, :11], k[:, :11], v[:, :11], log_decay[:, :11], bonus, state, chunk_size=4)
    steps = []
    for t in range(11, 17):
        y_t, s = rwkv5_recurrence_step(r[:, t], k[:, t], v[:, t], log_decay[:, t], bonus, s)
        steps.append(y_t)
    assert_close_rms(torch.cat([y_prefix, torch.stack(steps, 1)], 1), y_all, TOLERANCE[torch.float64], "steps")
    assert_close_rms(s, s_all, TOLERANCE[torch.float64], "state after steps")
    # A decay shared by all rows, [H, K], as the layer passes it.
    shared = log_decay[0, 0]
    y_t, s_t = rwkv5_recurrence_step(r[:, 0], k[:, 0], v[:, 0], shared, bonus, state)
    y_b, s_b = rwkv5_recurrence_step(r[:, 0], k[:, 0], v[:, 0], shared.expand(2, -1, -1), bonus, state)
    assert torch.equal(y_t, y_b) and torch.equal(s_t, s_b)


def test_reference_by_hand_one_channel():
    """H = K = 1: y_t = r_t (u k_t v_t + S_{t-1}), S_t = w S_{t-1} + k_t v_t."""
    r = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    k = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    v = torch.tensor([2.0, 5.0]).view(1, 2, 1, 1)
    log_decay = torch.full((1, 2, 1, 1), torch.log(torch.tensor(0.5)).item())
    bonus = torch.tensor([[0.1]])
    # t0: y = 1 * (0.1 * 6 + 0) = 0.6; S = 6.  t1: y = 2 * (0.1 * 5 + 6) = 13; S = 0.5 * 6 + 5 = 8
    for form in (rwkv5_recurrence_reference, rwkv5_recurrence):
        y, s = form(r, k, v, log_decay, bonus, torch.zeros(1, 1, 1, 1))
        torch.testing.assert_close(y.flatten(), torch.tensor([0.6, 13.0]))
        torch.testing.assert_close(s.flatten(), torch.tensor([8.0]))


def test_empty_sequence_returns_the_state_unchanged():
    r, k, v, log_decay, bonus, state = _inputs(2, 0, 3, 4, 5)
    for form in (rwkv5_recurrence_reference, rwkv5_recurrence):
        y, s = form(r, k, v, log_decay, bonus, state)
        assert y.shape == (2, 0, 3, 5)
        assert torch.equal(s, state)


def test_errors_name_the_expected_shapes():
    r, k, v, log_decay, bonus, state = _inputs(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"r, k and log_decay must share the shape \[B, T, H, K\]"):
        rwkv5_recurrence(r, k[:, :4], v, log_decay, bonus, state)
    with pytest.raises(ValueError, match=r"v must have shape \[B, T, H, V\]"):
        rwkv5_recurrence(r, k, v[:, :, :2], log_decay, bonus, state)
    with pytest.raises(ValueError, match=r"bonus must have shape \[H, K\] = \(3, 4\)"):
        rwkv5_recurrence_reference(r, k, v, log_decay, bonus[:, :2], state)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\] = \(2, 3, 4, 4\)"):
        rwkv5_recurrence(r, k, v, log_decay, bonus, state[:1])
    with pytest.raises(ValueError, match=r"\(4 dims\)"):
        rwkv5_recurrence(r[0], k, v, log_decay, bonus, state)
    with pytest.raises(ValueError, match="chunk_size"):
        rwkv5_recurrence(r, k, v, log_decay, bonus, state, chunk_size=0)

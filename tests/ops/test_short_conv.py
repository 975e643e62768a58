import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops.short_conv import ShortConvState, short_conv, short_conv_reference, short_conv_step


@pytest.mark.parametrize("length, channels, kernel", [(1, 3, 3), (15, 7, 3), (63, 10, 4), (500, 6, 1), (2048, 5, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_matches_reference_and_nn_conv1d(length, channels, kernel, with_bias):
    x = torch.randn(2, length, channels, dtype=torch.float64)
    weight = torch.randn(channels, kernel, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64) if with_bias else None
    out = short_conv(x, weight, bias)
    torch.testing.assert_close(out, short_conv_reference(x, weight, bias))
    conv = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=with_bias).double()
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        if with_bias:
            conv.bias.copy_(bias)
        official = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
    torch.testing.assert_close(out, official)


def test_bf16_and_gradients():
    x = torch.randn(2, 31, 6, requires_grad=True)
    weight = torch.randn(6, 3, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    grad_out = torch.randn(2, 31, 6)
    (short_conv(x, weight, bias) * grad_out).sum().backward()
    fast = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    (short_conv_reference(x, weight, bias) * grad_out).sum().backward()
    for ours, ref in zip(fast, (x.grad, weight.grad, bias.grad)):
        assert_close_rms(ours, ref, TOLERANCE[torch.float32])
    out16 = short_conv(x.detach().bfloat16(), weight.detach().bfloat16(), bias.detach().bfloat16())
    assert out16.dtype == torch.bfloat16
    assert_close_rms(out16, short_conv_reference(x.detach(), weight.detach(), bias.detach()), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("kernel", [1, 3, 4])
def test_steps_and_continuation_equal_whole(kernel):
    x = torch.randn(2, 20, 5)
    weight, bias = torch.randn(5, kernel), torch.randn(5)
    full = short_conv(x, weight, bias)
    state = ShortConvState.empty(2, 5, kernel)
    steps = []
    for t in range(20):
        y_t, state = short_conv_step(state, x[:, t], weight, bias)
        steps.append(y_t)
    assert_close_rms(torch.stack(steps, 1), full, TOLERANCE[torch.float32])
    head, mid_state = short_conv(x[:, :7], weight, bias, return_final_state=True)
    tail, final = short_conv(x[:, 7:], weight, bias, initial_state=mid_state, return_final_state=True)
    assert_close_rms(torch.cat([head, tail], 1), full, TOLERANCE[torch.float32])
    torch.testing.assert_close(final.history, state.history)
    assert state.history.shape == (2, 5, kernel - 1)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, T, C\] with C = 4"):
        short_conv(torch.randn(2, 5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\[C, K\]"):
        short_conv(torch.randn(2, 5, 3), torch.randn(3))
    with pytest.raises(ValueError, match=r"floating-point"):
        short_conv(torch.ones(2, 5, 3, dtype=torch.long), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        short_conv_step(ShortConvState.empty(2, 3, 3), torch.randn(2, 1, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"state.history"):
        short_conv_step(ShortConvState.empty(2, 3, 4), torch.randn(2, 3), torch.randn(3, 3))

"""The Mamba-1 mixer against the causal-mixer contract."""

from __future__ import annotations

import math

import pytest
import torch

import mixer_contract
from gradient_checks import assert_gradients_match_finite_differences
from helpers import assert_close_rms
from linmix.layers.base import CausalMixer, MixerState
from linmix.layers.mamba import Mamba, MambaState


def make_layer(**kwargs) -> Mamba:
    kwargs = {"d_model": 12, "d_state": 5, **kwargs}
    layer = Mamba(**kwargs)
    # Larger, varied step sizes and a non-trivial conv bias so the tests exercise the decays and padding.
    with torch.no_grad():
        layer.dt_proj.bias.uniform_(-2.0, 1.0)
        if layer.conv1d.bias is not None:
            layer.conv1d.bias.uniform_(-1.0, 1.0)
    return layer


def test_is_a_causal_mixer_with_reference_parameter_names():
    layer = Mamba(64, d_state=16)
    assert isinstance(layer, CausalMixer) and layer.d_model == 64
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (4 + 32, 128),
        "dt_proj.weight": (128, 4),
        "dt_proj.bias": (128,),
        "A_log": (128, 16),
        "D": (128,),
        "out_proj.weight": (64, 128),
    }
    torch.testing.assert_close(-torch.exp(layer.A_log), -torch.arange(1, 17.0).repeat(128, 1))
    step_sizes = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert step_sizes.min() >= 0.001 * 0.999 and step_sizes.max() <= 0.1 * 1.001


@pytest.mark.parametrize("options", [{}, {"d_conv": 2, "bias": True}, {"d_conv": 1, "conv_bias": False}, {"expand": 1, "dt_rank": 3}])
def test_steps_equal_forward(options):
    mixer_contract.check_steps_equal_forward(make_layer(**options), batch=2, length=20)


@pytest.mark.parametrize("prefix", [1, 2, 7])
def test_prefix_then_steps(prefix):
    mixer_contract.check_prefix_then_steps(make_layer(), batch=2, length=20, prefix=prefix)


@pytest.mark.parametrize("length, pad", [(12, 5), (2, 1), (1, 6)])
def test_left_padding(length, pad):
    mixer_contract.check_left_padding(make_layer(), length=length, pad=pad)


def test_state_size_constant():
    mixer_contract.check_state_size_constant(make_layer())


def test_long_sequence_forward_equals_chunked_forward():
    """T = 300 uses several scan chunks; splitting the sequence across forward calls changes nothing."""
    layer = make_layer().eval()
    x = torch.randn(1, 300, 12)
    with torch.no_grad():
        full = layer(x)
        head, state = layer(x[:, :137], return_state=True)
        tail = layer(x[:, 137:], state)
    assert_close_rms(torch.cat([head, tail], dim=1), full, 1e-5, "split forward")


def test_left_padding_with_a_state():
    """Continuing from a state with a left-padded batch equals continuing with each row alone."""
    layer = make_layer().eval()
    lengths = [10, 5]  # row 1 has 7 pads: more than the conv history of 3
    x = torch.randn(2, 12, 12) * 3.0
    mask = torch.tensor([[False] * (12 - n) + [True] * n for n in lengths])
    with torch.no_grad():
        _, state = layer(torch.randn(2, 6, 12), return_state=True)
        out, final = layer(x, state.clone(), attention_mask=mask, return_state=True)
        for row, n in enumerate(lengths):
            row_state = MambaState(conv=state.conv[row:row + 1].clone(), ssm=state.ssm[row:row + 1].clone())
            alone, alone_final = layer(x[row:row + 1, 12 - n:], row_state, return_state=True)
            assert_close_rms(out[row:row + 1, 12 - n:], alone, 1e-5, f"row {row}")
            assert_close_rms(final.ssm[row:row + 1], alone_final.ssm, 1e-5, f"ssm state row {row}")
            assert_close_rms(final.conv[row:row + 1], alone_final.conv, 1e-5, f"conv state row {row}")


def test_fully_padded_row_keeps_its_state():
    layer = make_layer().eval()
    with torch.no_grad():
        _, state = layer(torch.randn(1, 6, 12), return_state=True)
        _, after = layer(torch.randn(1, 2, 12), state.clone(), attention_mask=torch.zeros(1, 2), return_state=True)
    torch.testing.assert_close(after.ssm, state.ssm)
    torch.testing.assert_close(after.conv, state.conv)


def test_state_layout_and_size_accounting():
    layer = Mamba(64, d_state=16)
    state = layer.init_state(3)
    assert isinstance(state, MixerState)
    assert state.conv.shape == (3, 128, 3) and state.ssm.shape == (3, 128, 16)
    assert state.ssm.dtype == torch.float32
    # BASED paper accounting: 2 * d_model * d_state fp32 numbers (= d_inner * d_state at expand 2).
    assert layer.state_size_bytes(1024) == layer.state_size_bytes(8) == 4 * 2 * 64 * 16 == 4 * 128 * 16
    half = layer.init_state(1, dtype=torch.bfloat16)
    assert half.conv.dtype == torch.bfloat16 and half.ssm.dtype == torch.float32


def test_backward_reaches_every_parameter():
    layer = make_layer()
    x = torch.randn(2, 30, 12, requires_grad=True)
    layer(x).pow(2).mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    # The gradients are the loss's derivatives: fp32 autograd against fp64 finite differences.
    assert_gradients_match_finite_differences(layer, lambda module, inputs: module(inputs).pow(2).mean(), x.detach())


def test_bfloat16_layer_runs_close_to_fp32():
    layer = make_layer().eval()
    x = torch.randn(2, 40, 12)
    with torch.no_grad():
        expected = layer(x)
        layer_bf16 = make_layer().eval()
        layer_bf16.load_state_dict(layer.state_dict())
        layer_bf16.to(torch.bfloat16)
        actual = layer_bf16(x.bfloat16())
        state = layer_bf16.init_state(2)
        y_t, state = layer_bf16.step(x[:, 0].bfloat16(), state)
    assert actual.dtype == torch.bfloat16 and y_t.dtype == torch.bfloat16
    assert state.ssm.dtype == torch.float32 and state.conv.dtype == torch.bfloat16
    assert_close_rms(actual, expected, 5e-2, "bf16 layer")


def test_bad_inputs_raise():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"\[B, T, 12\]"):
        layer(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match=r"\[B, T, 12\]"):
        layer(torch.randn(5, 12))
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        layer.step(torch.randn(2, 1, 12), layer.init_state(2))
    with pytest.raises(ValueError, match=r"conv \[B, d_inner, d_conv - 1\]"):
        layer.step(torch.randn(3, 12), layer.init_state(2))
    with pytest.raises(ValueError, match="MambaState"):
        layer(torch.randn(2, 5, 12), state=(torch.zeros(1),))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\]"):
        layer(torch.randn(2, 5, 12), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="left padding"):
        layer(torch.randn(1, 5, 12), attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    for bad in ({"d_state": 0}, {"dt_rank": "big"}, {"dt_min": 0.2, "dt_max": 0.1}):
        with pytest.raises(ValueError):
            Mamba(12, **bad)


def test_auto_dt_rank():
    assert Mamba(33).dt_rank == math.ceil(33 / 16)

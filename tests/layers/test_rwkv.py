"""RWKVTimeMix: the causal mixer contract, masking, initialisation, errors."""

import math

import pytest
import torch

from gradient_checks import assert_gradients_match_finite_differences
from helpers import TOLERANCE, assert_close_rms
from mixer_contract import contract_tests
from linmix.layers.rwkv import RWKVTimeMix, RWKVTimeMixState
from linmix.ops.wkv import causal_wkv_reference

LAYERS = {
    "default_chunks": lambda: RWKVTimeMix(24, layer_id=1, num_layers=4),
    "small_chunks": lambda: RWKVTimeMix(24, layer_id=3, num_layers=4, chunk_size=4),
    "single_layer": lambda: RWKVTimeMix(9, chunk_size=5),
}


TestMixerContract = contract_tests(LAYERS)


def test_forward_matches_formula():
    """The layer is token shift + linears + the WKV oracle, written out."""
    layer = RWKVTimeMix(12, layer_id=2, num_layers=3, chunk_size=4).eval()
    x = torch.randn(2, 11, 12)
    shifted = torch.cat([torch.zeros(2, 1, 12), x[:, :-1]], dim=1)

    def mix(mu):
        return x * mu + shifted * (1 - mu)

    k, v, r = layer.key(mix(layer.time_mix_k)), layer.value(mix(layer.time_mix_v)), layer.receptance(mix(layer.time_mix_r))
    wkv = causal_wkv_reference(torch.exp(layer.time_decay).double(), layer.time_first.double(), k.double(), v.double())
    expected = layer.output(torch.sigmoid(r) * wkv.float())
    with torch.no_grad():
        assert_close_rms(layer(x), expected, TOLERANCE[torch.float32], "layer vs formula")


def test_left_padding_in_a_continued_chunk():
    """Padding in a later chunk (after a state) is skipped by the shift and by the decay."""
    layer = RWKVTimeMix(16, chunk_size=4).eval()
    x = torch.randn(1, 20, 16)
    padded = torch.cat([x[:, :8], 3 * torch.randn(1, 5, 16), x[:, 8:]], dim=1)
    mask = torch.ones(1, 25, dtype=torch.bool)
    mask[:, 8:13] = False
    with torch.no_grad():
        alone, alone_state = layer(x, return_state=True)
        head, state = layer(padded[:, :8], return_state=True)
        tail, state = layer(padded[:, 8:], state, attention_mask=mask[:, 8:], return_state=True)
        assert_close_rms(torch.cat([head, tail[:, 5:]], dim=1), alone, 1e-5, "padding after a state")
        holed, holed_state = layer(padded, attention_mask=mask, return_state=True)  # padding in the middle
        assert_close_rms(holed[:, mask[0]], alone, 1e-5, "holed mask")
        x_next = torch.randn(1, 16)
        expected, _ = layer.step(x_next, alone_state)
        for s in (state, holed_state):
            assert_close_rms(layer.step(x_next, s.clone())[0], expected, 1e-5, "step after padded prefill")


def test_all_padded_row_keeps_state():
    layer = RWKVTimeMix(8).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[False] * 6, [True] * 6])
    with torch.no_grad():
        _, state = layer(x[:, :3], return_state=True)
        before = state.clone()
        y, after = layer(x, state, attention_mask=mask, return_state=True)
    assert torch.isfinite(y).all()
    for name in ("a", "b", "p", "previous_x"):
        assert torch.allclose(getattr(after, name)[0], getattr(before, name)[0]), name


def test_state_size_and_nbytes():
    layer = RWKVTimeMix(24)
    assert layer.state_size_bytes(1) == layer.state_size_bytes(4096) == 4 * 4 * 24
    state = layer.init_state(1)
    assert isinstance(state, RWKVTimeMixState)
    assert state.nbytes() == layer.state_size_bytes(100)  # a, b, p, previous_x at fp32
    half = layer.init_state(3, dtype=torch.bfloat16)
    assert half.previous_x.dtype == torch.bfloat16 and half.a.dtype == torch.float32


def test_initialisation_follows_rwkv4():
    d, layers = 10, 6
    for layer_id in (0, 3, 5):
        layer = RWKVTimeMix(d, layer_id=layer_id, num_layers=layers)
        r0, r1 = layer_id / (layers - 1), 1 - layer_id / layers
        c = torch.arange(d, dtype=torch.float64)
        decay = -5 + 8 * (c / (d - 1)) ** (0.7 + 1.3 * r0)
        assert torch.allclose(layer.time_decay.double(), decay, atol=1e-6)
        assert float(layer.time_decay.detach()[0]) == -5.0 and abs(float(layer.time_decay.detach()[-1]) - 3.0) < 1e-6
        first = math.log(0.3) + 0.5 * ((c + 1) % 3 - 1)
        assert torch.allclose(layer.time_first.double(), first, atol=1e-6)
        x = c / d
        assert torch.allclose(layer.time_mix_k.double(), x**r1, atol=1e-6)
        assert torch.allclose(layer.time_mix_v.double(), x**r1 + 0.3 * r0, atol=1e-6)
        assert torch.allclose(layer.time_mix_r.double(), x ** (0.5 * r1), atol=1e-6)


def test_backward_and_bf16():
    layer = RWKVTimeMix(16, layer_id=1, num_layers=2, chunk_size=4)
    x = torch.randn(2, 13, 16, requires_grad=True)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    y = layer(x, attention_mask=mask)
    y.square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert float(parameter.grad.abs().sum()) > 0, name
    assert torch.equal(x.grad[1, :4], torch.zeros_like(x.grad[1, :4]))  # padding has no influence
    # The gradients (chunked training path) are the loss's derivatives: against fp64 finite differences.
    assert_gradients_match_finite_differences(
        layer, lambda module, inputs: module(inputs, attention_mask=mask).square().mean(), x.detach())
    # Training through step (grad enabled) gives the same gradients as forward.
    layer.zero_grad()
    state = layer.init_state(2)
    outputs = []
    for t in range(13):
        y_t, state = layer.step(x[:, t].detach(), state)
        outputs.append(y_t)
    torch.stack(outputs, 1)[0].square().mean().backward()
    step_grad = layer.time_decay.grad.clone()
    layer.zero_grad()
    layer(x.detach()[:1]).square().mean().backward()
    assert_close_rms(step_grad, layer.time_decay.grad, 1e-4, "time_decay grad, steps vs forward")

    with torch.no_grad():
        reference = layer(x)
        y_half = layer.to(torch.bfloat16)(x.bfloat16())
    assert y_half.dtype == torch.bfloat16
    assert_close_rms(y_half, reference, 5e-2, "bf16 layer")


def test_bad_inputs_raise():
    layer = RWKVTimeMix(8)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 8\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 8\]"):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor of shape \[B, T, 8\]"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(2, 5\)"):
        layer(torch.randn(2, 5, 8), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 8\]"):
        layer.step(torch.randn(2, 1, 8), layer.init_state(2))
    with pytest.raises(ValueError, match=r"state.a must have shape \[B, d_model\] = \[2, 8\]"):
        layer.step(torch.randn(2, 8), layer.init_state(3))
    with pytest.raises(ValueError, match=r"state must be an RWKVTimeMixState"):
        layer(torch.randn(2, 5, 8), state=object())
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        RWKVTimeMix(0)
    with pytest.raises(ValueError, match=r"layer_id must be an integer in \[0, num_layers\) = \[0, 3\)"):
        RWKVTimeMix(8, layer_id=3, num_layers=3)

"""Checks every causal mixer must pass (see linmix.layers.base): used by the layer tests."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close_rms


def check_steps_equal_forward(layer, batch: int, length: int, tolerance: float = 1e-5) -> None:
    """Stepping token by token from init_state equals the whole-sequence forward (fp32)."""
    layer.eval()
    x = torch.randn(batch, length, layer.d_model)
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(batch)
        outputs = []
        for t in range(length):
            y_t, state = layer.step(x[:, t], state)
            outputs.append(y_t)
    assert_close_rms(torch.stack(outputs, dim=1), full, tolerance, "step vs forward")


def check_prefix_then_steps(layer, batch: int, length: int, prefix: int, tolerance: float = 1e-5) -> None:
    """forward(prefix, return_state=True) then steps, and forward(prefix) then forward(rest, state),
    both equal the whole forward."""
    layer.eval()
    x = torch.randn(batch, length, layer.d_model)
    with torch.no_grad():
        full = layer(x)
        head, state = layer(x[:, :prefix], return_state=True)
        saved = state.clone()
        outputs = [head]
        for t in range(prefix, length):
            y_t, state = layer.step(x[:, t], state)
            outputs.append(y_t[:, None])
        assert_close_rms(torch.cat(outputs, dim=1), full, tolerance, "prefix forward + steps vs forward")
        tail, _ = layer(x[:, prefix:], saved, return_state=True)
        assert_close_rms(torch.cat([head, tail], dim=1), full, tolerance, "chunked forward vs forward")


def check_left_padding(layer, length: int = 12, pad: int = 5, tolerance: float = 1e-5) -> None:
    """A left-padded row gives the same outputs and final state as the unpadded row alone."""
    layer.eval()
    x = torch.randn(1, length, layer.d_model)
    noise = torch.randn(1, pad, layer.d_model) * 3.0
    padded = torch.cat([noise, x], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, length, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone, state_alone = layer(x, return_state=True)
        with_pad, state_pad = layer(padded, attention_mask=mask, return_state=True)
        assert_close_rms(with_pad[:, pad:], alone, tolerance, "left-padded forward vs alone")
        # Decoding on from either state gives the same next outputs.
        x_next = torch.randn(1, layer.d_model)
        y_alone, _ = layer.step(x_next, state_alone)
        y_pad, _ = layer.step(x_next, state_pad)
        assert_close_rms(y_pad, y_alone, tolerance, "step after left-padded prefill")


def check_state_size_constant(layer, steps: int = 40) -> None:
    """Decode memory does not grow with the number of steps (fixed-state mixers only)."""
    state = layer.init_state(2)
    with torch.no_grad():
        y, state = layer.step(torch.randn(2, layer.d_model), state)
        first = state.nbytes()
        for _ in range(steps):
            y, state = layer.step(torch.randn(2, layer.d_model), state)
    assert state.nbytes() == first


def contract_tests(layers: dict, lengths=(1, 15, 37)) -> type:
    """A test class running the four checks above on every factory in `layers` (name -> callable
    returning a fresh layer). A test module binds it to a name starting with `Test`."""
    names = sorted(layers)

    class MixerContract:
        @pytest.mark.parametrize("name", names)
        @pytest.mark.parametrize("length", lengths)
        def test_steps_equal_forward(self, name, length):
            check_steps_equal_forward(layers[name](), batch=2, length=length)

        @pytest.mark.parametrize("name", names)
        def test_prefix_then_steps(self, name):
            check_prefix_then_steps(layers[name](), batch=2, length=30, prefix=17)

        @pytest.mark.parametrize("name", names)
        def test_left_padding(self, name):
            check_left_padding(layers[name]())

        @pytest.mark.parametrize("name", names)
        def test_state_size_constant(self, name):
            check_state_size_constant(layers[name]())

    return MixerContract

"""selective_scan (chunked fast path) and selective_scan_step against the sequential reference."""

from __future__ import annotations

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops.selective_scan import selective_scan, selective_scan_reference, selective_scan_step


def make_inputs(batch=2, length=15, channels=24, state_size=5, *, skip=False, gate=False, bias=False, initial=False,
                dtype=torch.float32):
    """Random inputs in the [B, T, D] layout; delta > 0 and A < 0 as in a Mamba layer."""
    inputs = {
        "u": torch.randn(batch, length, channels),
        "delta": torch.rand(batch, length, channels) * 0.5 + 0.01,
        "A": -torch.rand(channels, state_size) * 4 - 0.1,
        "B": torch.randn(batch, length, state_size),
        "C": torch.randn(batch, length, state_size),
    }
    if skip:
        inputs["D"] = torch.randn(channels)
    if gate:
        inputs["z"] = torch.randn(batch, length, channels)
    if bias:
        inputs["delta"] = torch.randn(batch, length, channels) - 1.0  # raw, made positive by softplus
        inputs["delta_bias"] = torch.randn(channels) * 0.5
    if initial:
        inputs["initial_state"] = torch.randn(batch, channels, state_size)
    return {name: value.to(dtype) for name, value in inputs.items()}


def reference(inputs, softplus=False, **kwargs):
    """The oracle in fp64 on exactly the given values."""
    return selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=softplus, **kwargs)


OPTIONS = {
    "plain": {},
    "skip_gate": {"skip": True, "gate": True},
    "bias_softplus": {"bias": True},
    "initial_state": {"initial": True},
    "all": {"skip": True, "gate": True, "bias": True, "initial": True},
}


@pytest.mark.parametrize("length", [1, 15, 63, 500])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fast_matches_reference_fp32(length, option):
    inputs = make_inputs(length=length, **OPTIONS[option])
    softplus = "delta_bias" in inputs
    y, state = selective_scan(**inputs, delta_softplus=softplus, return_final_state=True)
    y_ref, state_ref = reference(inputs, softplus, return_final_state=True)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert_close_rms(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close_rms(state, state_ref, TOLERANCE[torch.float32], "final state")


def test_fast_matches_reference_long_sequence():
    inputs = make_inputs(batch=1, length=2048, channels=6, state_size=3, skip=True, gate=True)
    assert_close_rms(selective_scan(**inputs), reference(inputs), TOLERANCE[torch.float32], "T=2048")


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 16, 50, 64])
def test_chunk_sizes_dividing_or_not(chunk_size):
    inputs = make_inputs(length=50, initial=True, skip=True)
    y, state = selective_scan(**inputs, chunk_size=chunk_size, return_final_state=True)
    y_ref, state_ref = reference(inputs, return_final_state=True)
    assert_close_rms(y, y_ref, TOLERANCE[torch.float32], f"chunk {chunk_size}")
    assert_close_rms(state, state_ref, TOLERANCE[torch.float32], f"state, chunk {chunk_size}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_fp32(dtype):
    inputs = make_inputs(length=63, skip=True, gate=True, dtype=dtype)
    y, state = selective_scan(**inputs, return_final_state=True, chunk_size=8)
    assert y.dtype == dtype and state.dtype == torch.float32
    y_ref, state_ref = reference(inputs, return_final_state=True)
    assert_close_rms(y, y_ref, TOLERANCE[torch.bfloat16], str(dtype))
    assert_close_rms(state, state_ref, 1e-5, "state from half inputs")  # only the output is rounded


def test_reference_upcasts_half_inputs():
    inputs = make_inputs(length=15, dtype=torch.bfloat16)
    y = selective_scan_reference(**inputs)
    assert y.dtype == torch.bfloat16
    assert_close_rms(y, reference(inputs), TOLERANCE[torch.bfloat16], "reference in bf16")


def test_large_decays_stay_finite():
    """Strong decays within a long chunk: exponents are differences <= 0, so nothing overflows."""
    inputs = make_inputs(length=200, channels=8, state_size=4)
    inputs["delta"] = inputs["delta"] * 20
    inputs["A"] = inputs["A"] * 25
    y = selective_scan(**inputs, chunk_size=200)
    assert torch.isfinite(y).all()
    assert_close_rms(y, reference(inputs), TOLERANCE[torch.float32], "large decays")


@pytest.mark.parametrize("option", ["plain", "all"])
def test_gradients_match_reference(option):
    inputs = make_inputs(length=37, channels=6, state_size=4, **OPTIONS[option])
    softplus = "delta_bias" in inputs
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    weights = torch.randn(2, 37, 6)
    state_weights = torch.randn(2, 6, 4)
    y, state = selective_scan(**leaves, delta_softplus=softplus, return_final_state=True, chunk_size=8)
    ((y * weights).sum() + (state * state_weights).sum()).backward()
    y_ref, state_ref = selective_scan_reference(**leaves64, delta_softplus=softplus, return_final_state=True)
    ((y_ref * weights.double()).sum() + (state_ref * state_weights.double()).sum()).backward()
    for name in leaves:
        assert_close_rms(leaves[name].grad, leaves64[name].grad, TOLERANCE[torch.float32], f"grad {name}")


@pytest.mark.parametrize("option", ["plain", "all"])
def test_steps_equal_whole_sequence(option):
    inputs = make_inputs(length=20, **OPTIONS[option])
    softplus = "delta_bias" in inputs
    y_full, state_full = selective_scan(**inputs, delta_softplus=softplus, return_final_state=True)
    state = inputs.get("initial_state", torch.zeros(2, 24, 5)).clone()
    state_object = state
    outputs = []
    for t in range(20):
        y_t, state = selective_scan_step(
            state, inputs["u"][:, t], inputs["delta"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t],
            D=inputs.get("D"), z_t=inputs["z"][:, t] if "z" in inputs else None,
            delta_bias=inputs.get("delta_bias"), delta_softplus=softplus,
        )
        outputs.append(y_t)
    assert state is state_object  # updated in place
    assert_close_rms(torch.stack(outputs, dim=1), y_full, TOLERANCE[torch.float32], "steps vs whole")
    assert_close_rms(state, state_full, TOLERANCE[torch.float32], "state after steps")


def test_prefix_state_then_rest_equals_whole():
    inputs = make_inputs(length=40, skip=True)
    y_full = selective_scan(**inputs)
    head = {k: v[:, :25] if v.dim() == 3 else v for k, v in inputs.items()}
    tail = {k: v[:, 25:] if v.dim() == 3 else v for k, v in inputs.items()}
    y_head, state = selective_scan(**head, return_final_state=True)
    y_tail = selective_scan(**tail, initial_state=state)
    assert_close_rms(torch.cat([y_head, y_tail], dim=1), y_full, TOLERANCE[torch.float32], "split")


def test_empty_sequence():
    inputs = make_inputs(length=0, initial=True)
    y, state = selective_scan(**inputs, return_final_state=True)
    assert y.shape == (2, 0, 24)
    torch.testing.assert_close(state, inputs["initial_state"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(u=i["u"][0]), r"u must have shape \[B, T, D\]"),
        (lambda i: i.update(delta=i["delta"][:, :3]), r"delta must have shape \[B, T, D\]"),
        (lambda i: i.update(A=i["A"].T), r"A must have shape \[D, N\]"),
        (lambda i: i.update(B=i["B"][:, :, :2]), r"B must have shape \[B, T, N\]"),
        (lambda i: i.update(C=i["C"][:1]), r"C must have shape \[B, T, N\]"),
        (lambda i: i.update(D=torch.ones(3)), r"D must have shape \[D\]"),
        (lambda i: i.update(z=torch.ones(2, 15)), r"z must have shape \[B, T, D\]"),
        (lambda i: i.update(initial_state=torch.zeros(2, 5, 24)), r"initial_state must have shape \[B, D, N\]"),
        (lambda i: i.update(u=i["u"].long()), r"u must be a floating-point tensor of shape \[B, T, D\]"),
        (lambda i: i.update(B=i["B"].numpy()), r"B must be a torch.Tensor of shape \[B, T, N\]"),
    ],
)
def test_bad_inputs_raise(change, message):
    inputs = make_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)
    with pytest.raises(ValueError, match=message):
        selective_scan_reference(**inputs)


def test_bad_chunk_size_and_step_inputs_raise():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**inputs, chunk_size=0)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"state must be fp32 or fp64"):
        selective_scan_step(torch.zeros(2, 24, 5, dtype=torch.bfloat16), u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match=r"state must have shape \[B, D, N\]"):
        selective_scan_step(torch.zeros(24, 5), u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match=r"u_t must have shape \[B, D\]"):
        selective_scan_step(torch.zeros(2, 24, 5), u[:, :2], delta[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match=r"C_t must have shape \[B, N\]"):
        selective_scan_step(torch.zeros(2, 24, 5), u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0, :4])


@pytest.mark.slow
def test_fast_matches_reference_benchmark_shape():
    inputs = make_inputs(batch=1, length=2048, channels=256, state_size=16, skip=True, gate=True)
    assert_close_rms(selective_scan(**inputs), selective_scan_reference(**inputs), TOLERANCE[torch.float32], "D=256, N=16")

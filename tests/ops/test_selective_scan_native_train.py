"""The native C selective scan for CPU training (selective_scan_train.c, linmix.ops.selective_scan_native):
forward against the sequential reference, every gradient against the torch path in fp64, the
dispatch rules of selective_scan's backend, and the Mamba layer and LM on both paths."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms
from linmix.ops import native, selective_scan_native
from linmix.ops.selective_scan import native_scan_applies, selective_scan, selective_scan_reference

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable: " + native.unavailable_reason())

GRAD_TOLERANCE = 2e-5  # fp32 kernel against the fp64 torch path, rms-relative


def make_inputs(batch=2, length=37, channels=21, state_size=5, *, initial=True, bias=True, skip=True, gate=True):
    """Random fp32 inputs as in a Mamba layer: raw delta made positive by bias + softplus, A < 0."""
    inputs = {
        "u": torch.randn(batch, length, channels),
        "delta": torch.randn(batch, length, channels) - 1.0,
        "A": -torch.rand(channels, state_size) * 4 - 0.1,
        "B": torch.randn(batch, length, state_size),
        "C": torch.randn(batch, length, state_size),
    }
    if bias:
        inputs["delta_bias"] = torch.randn(channels) * 0.5
    if skip:
        inputs["D"] = torch.randn(channels)
    if gate:
        inputs["z"] = torch.randn(batch, length, channels)
    if initial:
        inputs["initial_state"] = torch.randn(batch, channels, state_size)
    return inputs


def _count_native_calls(monkeypatch) -> list:
    calls = []
    original = selective_scan_native.native.selective_scan_forward_native
    monkeypatch.setattr(native, "selective_scan_forward_native", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# batch, length, channels, state_size: odd T, T = 1, T over several checkpoint chunks (32 tokens) or
# exactly two, channels below one 16-channel alignment, not a multiple of the 64-channel block, several blocks.
SHAPES = [(2, 37, 21, 5), (1, 1, 16, 4), (3, 100, 130, 16), (2, 64, 64, 16), (1, 33, 7, 1)]


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, initial):
    batch, length, channels, state_size = shape
    inputs = make_inputs(batch, length, channels, state_size, initial=initial)
    y, state = selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="native")
    y_ref, state_ref = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True,
                                                return_final_state=True)
    assert y.dtype == torch.float32 and state.dtype == torch.float32 and state.shape == (batch, channels, state_size)
    assert_close_rms(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close_rms(state, state_ref, TOLERANCE[torch.float32], "final state")
    # Without the final state: y alone, the same values.
    assert torch.equal(selective_scan(**inputs, delta_softplus=True, backend="native"), y)


@pytest.mark.parametrize("use_final_state", [False, True])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_torch_path_in_fp64(shape, initial, use_final_state):
    batch, length, channels, state_size = shape
    inputs = make_inputs(batch, length, channels, state_size, initial=initial)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    weights = torch.randn(batch, length, channels, dtype=torch.float64)
    state_weights = torch.randn(batch, channels, state_size, dtype=torch.float64)

    def loss(values, backend, dtype):
        y, state = selective_scan(**values, delta_softplus=True, return_final_state=True, backend=backend)
        total = (y * weights.to(dtype)).sum()
        return total + (state * state_weights.to(dtype)).sum() if use_final_state else total

    loss(leaves, "native", torch.float32).backward()
    loss(leaves64, "torch", torch.float64).backward()
    assert set(leaves) >= {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    for name in leaves:
        # With T = 1 and a zero start, A has no effect: the torch path leaves its grad None, the kernel 0.
        expected = leaves64[name].grad if leaves64[name].grad is not None else torch.zeros_like(leaves64[name])
        assert_close_rms(leaves[name].grad, expected, GRAD_TOLERANCE, f"grad {name}")


def test_only_final_state_used_and_some_inputs_without_grad():
    """A loss on the final state alone (no gradient reaches y), and only u and A requiring grad."""
    inputs = make_inputs(2, 40, 24, 6, initial=True, gate=False, skip=False)
    grads = {}
    for backend, dtype in (("native", torch.float32), ("torch", torch.float64)):
        values = {k: v.to(dtype, copy=True) for k, v in inputs.items()}
        values["u"].requires_grad_(True)
        values["A"].requires_grad_(True)
        _, state = selective_scan(**values, delta_softplus=True, return_final_state=True, backend=backend)
        state.square().sum().backward()
        grads[backend] = (values["u"].grad, values["A"].grad)
    assert grads["native"][0].abs().max() > 0
    for got, want, name in zip(grads["native"], grads["torch"], ("u", "A")):
        assert_close_rms(got, want, GRAD_TOLERANCE, f"grad {name}")


def test_delta_without_softplus_and_no_bias():
    """delta passed already positive (as the Mamba layer does), no bias, no softplus."""
    inputs = make_inputs(2, 19, 20, 3, bias=False)
    inputs["delta"] = torch.rand(2, 19, 20) * 0.5 + 0.01
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y = selective_scan(**leaves, backend="native")
    y64 = selective_scan(**leaves64, backend="torch")
    assert_close_rms(y, y64, TOLERANCE[torch.float32], "y")
    weights = torch.randn_like(y64)
    (y * weights.float()).sum().backward()
    (y64 * weights).sum().backward()
    for name in leaves:
        assert_close_rms(leaves[name].grad, leaves64[name].grad, GRAD_TOLERANCE, f"grad {name}")


def test_kernel_direct_gradients_with_zero_upstream():
    """The backward wrapper with neither grad_y nor grad_final (both None): every gradient is zero."""
    inputs = make_inputs(1, 10, 16, 2, bias=False, skip=False, gate=False)
    delta = torch.rand(1, 10, 16)
    every = native.TRAIN_CHECKPOINT_EVERY
    _, _, checkpoints = native.selective_scan_forward_native(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"],
                                                             inputs["initial_state"], checkpoint_every=every)
    grads = native.selective_scan_backward_native(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"], checkpoints,
                                                  None, None, checkpoint_every=every, initial_state_grad=True)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_dispatch_rules(monkeypatch):
    inputs = make_inputs(1, 12, 16, 4)
    calls = _count_native_calls(monkeypatch)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    expected = selective_scan(**inputs, delta_softplus=True, backend="torch")

    # auto: native for fp32 CPU inputs, with autograd recording or not
    assert native_scan_applies(leaves["u"], leaves["delta"].detach().exp(), leaves["A"], leaves["B"], leaves["C"])
    assert_close_rms(selective_scan(**leaves, delta_softplus=True), expected, TOLERANCE[torch.float32], "auto, grad")
    assert len(calls) == 1
    with torch.no_grad():
        assert_close_rms(selective_scan(**inputs, delta_softplus=True), expected, TOLERANCE[torch.float32], "auto")
    assert len(calls) == 2

    # torch: never native; LINMIX_FORCE_REFERENCE makes auto take torch
    assert torch.equal(selective_scan(**inputs, delta_softplus=True, backend="torch"), expected)
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    assert torch.equal(selective_scan(**leaves, delta_softplus=True), expected.detach())
    assert not native_scan_applies(inputs["u"], inputs["delta"].exp(), inputs["A"], inputs["B"], inputs["C"])
    monkeypatch.delenv("LINMIX_FORCE_REFERENCE")
    assert len(calls) == 2

    # fp64 and positive A (the kernel's exp is for arguments <= 0): auto falls back, native raises
    double = {k: v.double() for k, v in inputs.items()}
    assert_close_rms(selective_scan(**double, delta_softplus=True), expected.double(), TOLERANCE[torch.float32], "fp64")
    positive_A = {**inputs, "A": -inputs["A"]}
    assert torch.equal(selective_scan(**positive_A, delta_softplus=True),
                       selective_scan(**positive_A, delta_softplus=True, backend="torch"))
    negative_delta = {**inputs, "delta": -inputs["delta"].abs() - 0.1}
    negative_delta.pop("delta_bias")
    selective_scan(**negative_delta)  # no softplus, delta < 0: torch
    assert len(calls) == 2
    with pytest.raises(ValueError, match="backend='native' needs A <= 0"):
        selective_scan(**positive_A, delta_softplus=True, backend="native")
    with pytest.raises(ValueError, match="delta"):
        selective_scan(**negative_delta, backend="native")
    with pytest.raises(ValueError, match="fp32 inputs"):
        selective_scan(**double, delta_softplus=True, backend="native")
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**inputs, backend="triton")


def test_tracing_takes_the_torch_path(monkeypatch):
    inputs = make_inputs(1, 6, 16, 2, initial=False, gate=False, skip=False, bias=False)
    inputs["delta"] = inputs["delta"].exp()
    calls = _count_native_calls(monkeypatch)

    def scan(u, delta, A, B, C):
        return selective_scan(u, delta, A, B, C)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and constant-shape warnings
        # check_trace=False: the tracer's check re-runs the function untraced (native there is right)
        traced = torch.jit.trace(scan, (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"]),
                                 check_trace=False)
    assert not calls
    assert_close_rms(traced(*inputs.values()), selective_scan(**inputs, backend="torch"), TOLERANCE[torch.float32], "traced")


def test_bad_kernel_inputs_raise():
    u = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="delta must have shape"):
        native.selective_scan_forward_native(u, torch.rand(1, 5, 8), -torch.rand(8, 2), torch.randn(1, 4, 2), torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.selective_scan_forward_native(u.double(), torch.rand(1, 4, 8).double(), -torch.rand(8, 2).double(),
                                             torch.randn(1, 4, 2).double(), torch.randn(1, 4, 2).double())
    with pytest.raises(ValueError, match="checkpoints must have shape"):
        native.selective_scan_backward_native(u, torch.rand(1, 4, 8), -torch.rand(8, 2), torch.randn(1, 4, 2),
                                              torch.randn(1, 4, 2), torch.zeros(1, 3, 2, 8), torch.randn(1, 4, 8), None,
                                              checkpoint_every=2, initial_state_grad=False)


def _backward_grads(module, loss) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _on_both_paths(monkeypatch, run):
    calls = _count_native_calls(monkeypatch)
    native_result = run()
    assert calls, "the native scan was not used"
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    count = len(calls)
    torch_result = run()
    assert len(calls) == count, "LINMIX_FORCE_REFERENCE=1 still ran the native scan"
    monkeypatch.delenv("LINMIX_FORCE_REFERENCE")
    return native_result, torch_result


def test_mamba_layer_native_equals_torch(monkeypatch):
    from linmix.layers.mamba import Mamba

    torch.manual_seed(0)
    layer = Mamba(48, d_state=8)
    x = torch.randn(2, 45, 48, requires_grad=True)
    prefix = torch.randn(2, 7, 48)

    def run():
        with torch.no_grad():
            _, state = layer(prefix, return_state=True)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, final = layer(x, state, return_state=True)
        (out.square().mean() + final.ssm.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        return out.detach(), final.ssm.detach(), x.grad.clone(), grads

    (out, ssm, gx, grads), (out_t, ssm_t, gx_t, grads_t) = _on_both_paths(monkeypatch, run)
    assert_close_rms(out, out_t, TOLERANCE[torch.float32], "output")
    assert_close_rms(ssm, ssm_t, TOLERANCE[torch.float32], "final ssm state")
    assert_close_rms(gx, gx_t, GRAD_TOLERANCE, "grad x")
    assert grads.keys() == grads_t.keys() and "A_log" in grads
    for name in grads:
        assert_close_rms(grads[name], grads_t[name], GRAD_TOLERANCE, f"grad {name}")


def test_mamba_lm_native_equals_torch(monkeypatch):
    from linmix.lm import BasedForCausalLM

    torch.manual_seed(0)
    model = BasedForCausalLM.from_preset("mamba-small", vocab_size=257)
    ids = torch.randint(0, 257, (1, 24))

    def run():
        model.zero_grad(set_to_none=True)
        output = model(ids, labels=ids)
        output.loss.backward()
        return output.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    (loss, grads), (loss_t, grads_t) = _on_both_paths(monkeypatch, run)
    assert abs(loss.item() - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    assert grads.keys() == grads_t.keys() and any("A_log" in name for name in grads)
    for name in grads:
        assert_close_rms(grads[name], grads_t[name], 1e-4, f"grad {name}")


def test_gradients_with_channel_slices_on_several_threads():
    """One batch row over three threads: three channel slices whose dB and dC shares are summed."""
    inputs = make_inputs(1, 41, 130, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y, state = selective_scan(**leaves, delta_softplus=True, return_final_state=True, backend="native")
        (y.sum() + state.sum()).backward()
    finally:
        torch.set_num_threads(threads)
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y64, state64 = selective_scan(**leaves64, delta_softplus=True, return_final_state=True, backend="torch")
    (y64.sum() + state64.sum()).backward()
    assert_close_rms(y, y64, TOLERANCE[torch.float32], "y")
    for name in leaves:
        assert_close_rms(leaves[name].grad, leaves64[name].grad, GRAD_TOLERANCE, f"grad {name}")


def test_long_sequence_gradients_stay_tight():
    """T = 700 (22 checkpoint chunks, fp32 sums of dA over every token): still within the tight tolerance."""
    inputs = make_inputs(1, 700, 16, 16)
    inputs["A"] = -torch.arange(1.0, 17.0).repeat(16, 1)  # Mamba's S4D-real init
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    for values, backend in ((leaves, "native"), (leaves64, "torch")):
        y, state = selective_scan(**values, delta_softplus=True, return_final_state=True, backend=backend)
        (y.sum() + state.sum()).backward()
    for name in leaves:
        assert_close_rms(leaves[name].grad, leaves64[name].grad, GRAD_TOLERANCE, f"grad {name}")

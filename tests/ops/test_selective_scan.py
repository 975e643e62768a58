"""selective_scan (chunked torch path, and its default backend) and selective_scan_step against the sequential
reference (the native training scan has its own tests: test_selective_scan_native_train.py)."""

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


@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the native scan on CPU where it builds
@pytest.mark.parametrize("length", [1, 15, 63, 500])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fast_matches_reference_fp32(length, option, backend):
    inputs = make_inputs(length=length, **OPTIONS[option])
    softplus = "delta_bias" in inputs
    y, state = selective_scan(**inputs, delta_softplus=softplus, return_final_state=True, backend=backend)
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
    y, state = selective_scan(**inputs, chunk_size=chunk_size, return_final_state=True, backend="torch")
    y_ref, state_ref = reference(inputs, return_final_state=True)
    assert_close_rms(y, y_ref, TOLERANCE[torch.float32], f"chunk {chunk_size}")
    assert_close_rms(state, state_ref, TOLERANCE[torch.float32], f"state, chunk {chunk_size}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_fp32(dtype):
    inputs = make_inputs(length=63, skip=True, gate=True, dtype=dtype)
    y, state = selective_scan(**inputs, return_final_state=True, chunk_size=8, backend="torch")
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
    y = selective_scan(**inputs, chunk_size=200, backend="torch")
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
    y, state = selective_scan(**leaves, delta_softplus=softplus, return_final_state=True, chunk_size=8, backend="torch")
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


# --------------------------------------------------------------------------------------------------
# several directions over one grid: cross_scan_selective_scan

from linmix.ops import native  # noqa: E402
from linmix.ops.selective_scan import (  # noqa: E402
    BIDIRECTIONAL_DIRECTIONS,
    CROSS_SCAN_DIRECTIONS,
    cross_scan_selective_scan,
    cross_scan_selective_scan_reference,
    from_scan_order,
    to_scan_order,
)


def make_grid_inputs(batch=2, height=5, width=7, channels=24, state_size=3, directions=CROSS_SCAN_DIRECTIONS,
                     dtype=torch.float32, skip=True, bias=True):
    """Random cross-scan inputs in grid order; raw delta (made positive by softplus), A < 0."""
    count, length = len(directions), height * width
    inputs = {
        "u": torch.randn(batch, length, channels),
        "delta": torch.randn(batch, count, length, channels) - 1.0,
        "A": -torch.rand(count, channels, state_size) * 4 - 0.1,
        "B": torch.randn(batch, count, length, state_size),
        "C": torch.randn(batch, count, length, state_size),
    }
    if skip:
        inputs["D"] = torch.randn(count, channels)
    if bias:
        inputs["delta_bias"] = torch.randn(count, channels) * 0.5
    return {name: value.to(dtype) for name, value in inputs.items()}


def grid_oracle(inputs, height, width, directions=CROSS_SCAN_DIRECTIONS):
    """Four separate plain sequential scans in fp64, one per direction, over explicitly permuted sequences."""
    total = 0
    for k, direction in enumerate(directions):
        order = [index for index in range(height * width)]
        if direction.startswith("column"):
            order = [h * width + w for w in range(width) for h in range(height)]
        if direction.endswith("reversed"):
            order = order[::-1]
        index = torch.tensor(order)
        y_k = selective_scan_reference(
            inputs["u"].double()[:, index], inputs["delta"].double()[:, k][:, index], inputs["A"].double()[k],
            inputs["B"].double()[:, k][:, index], inputs["C"].double()[:, k][:, index],
            D=inputs["D"].double()[k] if "D" in inputs else None,
            delta_bias=inputs["delta_bias"].double()[k] if "delta_bias" in inputs else None, delta_softplus=True)
        y_grid = torch.empty_like(y_k)
        y_grid[:, index] = y_k
        total = total + y_grid
    return total


@pytest.mark.parametrize("height, width", [(1, 1), (1, 9), (6, 1), (5, 7), (8, 8)])
def test_scan_order_round_trip_and_column_order(height, width):
    x = torch.arange(height * width, dtype=torch.float32).reshape(1, height * width, 1)
    column = to_scan_order(x, "column", height, width).flatten().tolist()
    assert column == [h * width + w for w in range(width) for h in range(height)]
    for direction in CROSS_SCAN_DIRECTIONS:
        torch.testing.assert_close(from_scan_order(to_scan_order(x, direction, height, width), direction, height, width), x)


@pytest.mark.parametrize("height, width", [(5, 7), (4, 4), (1, 6)])
def test_cross_scan_reference_equals_separate_scans(height, width):
    inputs = make_grid_inputs(height=height, width=width)
    y = cross_scan_selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, height=height, width=width,
                                            delta_softplus=True)
    assert_close_rms(y, grid_oracle(inputs, height, width), 1e-12, "reference")


@pytest.mark.parametrize("form", ["chunked", "doubling"])
@pytest.mark.parametrize("height, width, directions", [(5, 7, CROSS_SCAN_DIRECTIONS), (9, 4, CROSS_SCAN_DIRECTIONS),
                                                       (3, 11, BIDIRECTIONAL_DIRECTIONS), (1, 1, CROSS_SCAN_DIRECTIONS)])
def test_cross_scan_torch_forms_match_separate_scans(form, height, width, directions):
    inputs = make_grid_inputs(height=height, width=width, directions=directions)
    y = cross_scan_selective_scan(**inputs, height=height, width=width, directions=directions, delta_softplus=True,
                                  backend="torch", form=form, chunk_size=4)
    assert y.dtype == torch.float32
    assert_close_rms(y, grid_oracle(inputs, height, width, directions), TOLERANCE[torch.float32], form)


def test_cross_scan_bf16_loose():
    inputs = make_grid_inputs(dtype=torch.bfloat16)
    y = cross_scan_selective_scan(**inputs, height=5, width=7, delta_softplus=True, backend="torch")
    assert y.dtype == torch.bfloat16
    assert_close_rms(y, grid_oracle(inputs, 5, 7), TOLERANCE[torch.bfloat16], "bf16")


@pytest.mark.parametrize("form", ["chunked", "doubling"])
def test_cross_scan_gradients_match_reference(form):
    inputs = make_grid_inputs(batch=1, height=4, width=5, channels=6)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    weights = torch.randn(1, 20, 6)
    (cross_scan_selective_scan(**leaves, height=4, width=5, delta_softplus=True, backend="torch", form=form,
                               chunk_size=3) * weights).sum().backward()
    (cross_scan_selective_scan_reference(**leaves64, height=4, width=5, delta_softplus=True) * weights.double()).sum().backward()
    for name in leaves:
        assert_close_rms(leaves[name].grad, leaves64[name].grad, TOLERANCE[torch.float32], f"grad {name}")


needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable: " + native.unavailable_reason())


@needs_native
@pytest.mark.parametrize("batch, height, width, channels, state_size, directions", [
    (2, 5, 7, 24, 3, CROSS_SCAN_DIRECTIONS),    # odd T = 35, channels not a multiple of the 16/32 blocks
    (1, 9, 4, 77, 1, CROSS_SCAN_DIRECTIONS),    # d_state 1 (the SS2D default), 3 channel blocks, the last short
    (3, 1, 13, 5, 16, BIDIRECTIONAL_DIRECTIONS),
    (1, 1, 1, 1, 2, CROSS_SCAN_DIRECTIONS),
])
def test_native_matches_separate_scans(batch, height, width, channels, state_size, directions):
    inputs = make_grid_inputs(batch, height, width, channels, state_size, directions)
    y = cross_scan_selective_scan(**inputs, height=height, width=width, directions=directions, delta_softplus=True,
                                  backend="native")
    assert_close_rms(y, grid_oracle(inputs, height, width, directions), TOLERANCE[torch.float32], "native")


@needs_native
def test_native_reads_strided_views_and_no_skip_or_bias():
    """delta [B, K, T, D] and B, C as views of wider projections (the SS2D layer's layout), no D or bias,
    no softplus (delta >= 0 given), and extreme step sizes (softplus of +-30)."""
    batch, height, width, channels, count, state_size = 2, 3, 5, 20, 4, 2
    length = height * width
    projection = torch.randn(batch, length, count, 1 + 2 * state_size)
    B = projection[..., 1:1 + state_size].transpose(1, 2)
    C = projection[..., 1 + state_size:].transpose(1, 2)
    delta = torch.rand(batch, length, count, channels).transpose(1, 2)  # non-contiguous, channel stride 1
    inputs = {"u": torch.randn(batch, length, channels), "delta": delta, "A": -torch.rand(count, channels, state_size),
              "B": B, "C": C}
    y = cross_scan_selective_scan(**inputs, height=height, width=width, backend="native")
    expected = cross_scan_selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, height=height, width=width)
    assert_close_rms(y, expected, TOLERANCE[torch.float32], "strided")
    inputs["delta"] = delta * 60 - 30
    y = cross_scan_selective_scan(**inputs, height=height, width=width, backend="native", delta_softplus=True)
    expected = cross_scan_selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, height=height,
                                                   width=width, delta_softplus=True)
    assert_close_rms(y, expected, TOLERANCE[torch.float32], "large |delta|")


@needs_native
def test_native_dispatch_rules(monkeypatch):
    inputs = make_grid_inputs(batch=1, height=3, width=4, channels=8)
    kwargs = dict(height=3, width=4, delta_softplus=True)
    calls = []
    original = native.cross_selective_scan_native
    monkeypatch.setattr(native, "cross_selective_scan_native", lambda *a, **k: calls.append(1) or original(*a, **k))
    cross_scan_selective_scan(**inputs, **kwargs)
    assert calls == [1]  # auto: fp32 CPU without grad
    with torch.no_grad():
        cross_scan_selective_scan(**{**inputs, "A": -inputs["A"]}, **kwargs)  # A > 0: torch path
    assert calls == [1]
    u = inputs["u"].clone().requires_grad_(True)
    cross_scan_selective_scan(**{**inputs, "u": u}, **kwargs).sum().backward()
    assert calls == [1] and u.grad is not None  # autograd: torch path
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    cross_scan_selective_scan(**inputs, **kwargs)
    assert calls == [1]
    with pytest.raises(ValueError, match="backend='native' needs A <= 0"):
        cross_scan_selective_scan(**{**inputs, "A": -inputs["A"]}, **kwargs, backend="native")


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(u=i["u"][:, :-1]), r"T = height \* width"),
    (lambda i: i.update(delta=i["delta"][:, :2]), r"delta must have shape \[B, K, T, D\]"),
    (lambda i: i.update(A=i["A"][0]), r"A must have shape \[K, D, N\]"),
    (lambda i: i.update(B=i["B"][..., :1]), r"B must have shape \[B, K, T, N\]"),
    (lambda i: i.update(D=torch.ones(24)), r"D must have shape \[K, D\]"),
])
def test_cross_scan_bad_inputs_raise(change, message):
    inputs = make_grid_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        cross_scan_selective_scan(**inputs, height=5, width=7)
    with pytest.raises(ValueError, match="directions must be"):
        cross_scan_selective_scan(**make_grid_inputs(), height=5, width=7, directions=("row", "diagonal", "row", "row"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_low_rank_delta_pair_equals_the_formed_delta(backend):
    """delta given as Mamba's low-rank pair (dt_low [B, K, T, R], dt_weight [K, D, R]): the native kernel
    forms each step itself; 150 channels = one full block of 128 and a partial one."""
    batch, height, width, channels, rank, count = 2, 3, 7, 150, 5, 4
    inputs = make_grid_inputs(batch, height, width, channels, 2)
    projection = torch.randn(batch, height * width, count, rank + 3)
    dt_low = projection[..., :rank].transpose(1, 2)  # a strided view, as SS2D passes it
    dt_weight = torch.randn(count, channels, rank) * 0.3
    inputs["delta"] = (dt_low, dt_weight)
    y = cross_scan_selective_scan(**inputs, height=height, width=width, delta_softplus=True, backend=backend)
    formed = {**inputs, "delta": torch.einsum("bktr,kdr->bktd", dt_low, dt_weight)}
    assert_close_rms(y, grid_oracle(formed, height, width), TOLERANCE[torch.float32], backend)
    reference = cross_scan_selective_scan_reference(**{k: v for k, v in inputs.items()}, height=height, width=width,
                                                    delta_softplus=True)
    assert_close_rms(y, reference, TOLERANCE[torch.float32], "reference with the pair")


def test_low_rank_delta_pair_bad_shapes_raise():
    inputs = make_grid_inputs()
    inputs["delta"] = (torch.randn(2, 4, 35, 3), torch.randn(4, 24, 2))
    with pytest.raises(ValueError, match=r"dt_low must have shape \[B, K, T, R\]"):
        cross_scan_selective_scan(**inputs, height=5, width=7)
    inputs["delta"] = (torch.randn(2, 4, 35, 3),)
    with pytest.raises(ValueError, match="a pair"):
        cross_scan_selective_scan(**inputs, height=5, width=7)

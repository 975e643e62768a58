"""The Triton cross-scan selective-scan kernel equals four separate sequential scans (fp64 oracle),
forward and (through its torch backward) gradients. Without a GPU it runs under Triton's interpreter
(set before import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import TOLERANCE, assert_close_rms  # noqa: E402
from linmix.ops.selective_scan import (  # noqa: E402
    BIDIRECTIONAL_DIRECTIONS,
    CROSS_SCAN_DIRECTIONS,
    cross_scan_selective_scan,
    cross_scan_selective_scan_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, height, width, channels, state_size, count=4, dtype=torch.float32):
    length = height * width
    torch.manual_seed(0)
    inputs = {
        "u": torch.randn(batch, length, channels),
        "delta": torch.randn(batch, count, length, channels) - 1.0,
        "A": -torch.rand(count, channels, state_size) * 4 - 0.1,
        "B": torch.randn(batch, count, length, state_size),
        "C": torch.randn(batch, count, length, state_size),
        "D": torch.randn(count, channels),
        "delta_bias": torch.randn(count, channels) * 0.5,
    }
    return {k: v.to(device=DEVICE, dtype=dtype if k not in ("A",) else torch.float32) for k, v in inputs.items()}


def _oracle(inputs, height, width, directions=CROSS_SCAN_DIRECTIONS):
    return cross_scan_selective_scan_reference(**{k: v.double().cpu() for k, v in inputs.items()}, height=height,
                                               width=width, directions=directions, delta_softplus=True)


@pytest.mark.parametrize("batch, height, width, channels, state_size", [
    (2, 3, 5, 24, 3),   # odd T, N not a power of two
    (1, 4, 2, 70, 1),   # d_state 1 (SS2D's), two channel blocks, the last one partial
    (1, 1, 1, 5, 16),
])
def test_forward_equals_separate_scans_fp32(batch, height, width, channels, state_size):
    inputs = _inputs(batch, height, width, channels, state_size)
    y = cross_scan_selective_scan(**inputs, height=height, width=width, delta_softplus=True, backend="triton")
    assert y.dtype == torch.float32
    assert_close_rms(y.cpu(), _oracle(inputs, height, width), TOLERANCE[torch.float32])


def test_bidirectional_and_strided_views():
    batch, height, width, channels, state_size = 2, 2, 5, 12, 2
    inputs = _inputs(batch, height, width, channels, state_size, count=2)
    projection = torch.randn(batch, height * width, 2, 2 * state_size, device=DEVICE)
    inputs["B"] = projection[..., :state_size].transpose(1, 2)
    inputs["C"] = projection[..., state_size:].transpose(1, 2)
    y = cross_scan_selective_scan(**inputs, height=height, width=width, directions=BIDIRECTIONAL_DIRECTIONS,
                                  delta_softplus=True, backend="triton")
    assert_close_rms(y.cpu(), _oracle(inputs, height, width, BIDIRECTIONAL_DIRECTIONS), TOLERANCE[torch.float32])


def test_forward_bf16_keeps_dtype():
    inputs = _inputs(1, 3, 3, 16, 2, dtype=torch.bfloat16)
    y = cross_scan_selective_scan(**inputs, height=3, width=3, delta_softplus=True, backend="triton")
    assert y.dtype == torch.bfloat16
    assert_close_rms(y.cpu(), _oracle(inputs, 3, 3), TOLERANCE[torch.bfloat16])


def test_gradients_equal_oracle_gradients():
    inputs = _inputs(1, 2, 3, 6, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves64 = {k: v.double().cpu().requires_grad_(True) for k, v in inputs.items()}
    weights = torch.randn(1, 6, 6, device=DEVICE)
    (cross_scan_selective_scan(**leaves, height=2, width=3, delta_softplus=True, backend="triton") * weights).sum().backward()
    (cross_scan_selective_scan_reference(**leaves64, height=2, width=3, delta_softplus=True)
     * weights.double().cpu()).sum().backward()
    for name in leaves:
        assert_close_rms(leaves[name].grad.cpu(), leaves64[name].grad, TOLERANCE[torch.float32], f"grad {name}")

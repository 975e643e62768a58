"""Error measures for checking a fast path against its reference, shared by the tests and the
benchmark scripts (so a bound in a test and a number in a benchmark table mean the same thing)."""

from __future__ import annotations

import torch

__all__ = ["max_relative_error", "rms_relative_error"]


def _as_float64_pair(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach()
    if actual.shape != expected.shape:
        raise ValueError(f"actual and expected must have the same shape, got {tuple(actual.shape)} and {tuple(expected.shape)}")
    # fp64 on the CPU: the measure itself adds no rounding, and GPU tensors compare against CPU references.
    return actual.to("cpu", torch.float64), expected.to("cpu", torch.float64)


def rms_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_rms / ||expected||_rms`` in fp64 (the denominator floored at 1e-30, so an
    all-zero reference gives the absolute RMS error times 1e30 rather than a division by zero).

    Raises ValueError when the shapes differ (no broadcasting)."""
    actual, expected = _as_float64_pair(actual, expected)
    if expected.numel() == 0:
        return 0.0
    denominator = expected.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((actual - expected).pow(2).mean().sqrt() / denominator)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in fp64 (the worst element against the reference's
    scale; the denominator floored at 1e-30). Raises ValueError when the shapes differ."""
    actual, expected = _as_float64_pair(actual, expected)
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))

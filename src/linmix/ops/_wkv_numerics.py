"""Numerics shared by the WKV forms (torch, Triton, native): the empty-state exponent and the
NaN-free shift / divide / log / exclusive-sum helpers. Imports nothing from linmix, so every WKV
module (dispatcher and kernels alike) can sit above it."""

from __future__ import annotations

import torch

# "No contribution yet" exponent of an empty state (and the shift of a channel whose keys are all
# -inf): finite, so that differences of exponents never meet -inf - -inf, yet exp(EMPTY_EXPONENT -
# anything real) is exactly 0 in fp32.
EMPTY_EXPONENT = -1e38
NEG_INF = float("-inf")


def finite_or_zero(exponent: torch.Tensor) -> torch.Tensor:
    """A shift to subtract: -inf (no term at all) becomes 0 so that exp(-inf - shift) = 0, not NaN."""
    return torch.where(exponent == NEG_INF, torch.zeros_like(exponent), exponent)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (with NaN-free gradients)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)), torch.zeros_like(numerator))


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log(x) for x >= 0, -inf at 0 (with NaN-free gradients)."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), torch.full_like(x, NEG_INF))


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{j' < j} x_j' along ``dim`` (shifted inclusive cumsum: no subtraction, no cancellation)."""
    inclusive = torch.cumsum(x, dim=dim)
    return torch.cat([torch.zeros_like(inclusive.narrow(dim, 0, 1)), inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def exclusive_reverse_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{j' > j} x_j' along ``dim``."""
    return exclusive_cumsum(x.flip(dim), dim).flip(dim)

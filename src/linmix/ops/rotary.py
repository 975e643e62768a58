"""Rotary position embedding (RoPE), rotate-half convention.

Layout: ``x: [B, T, H, D]``. The rotation acts on the first ``rotary_dim`` channels of each head
(``rotary_dim`` even, at most ``D``); the remaining channels pass through unchanged. Those first
``rotary_dim`` channels are split into two halves ``x1 = x[..., :r/2]`` and ``x2 = x[..., r/2:r]``
and, with angle ``theta_m = position * base^(-2m / rotary_dim)`` for ``m = 0 .. r/2 - 1``::

    out1 = x1 * cos(theta) - x2 * sin(theta)
    out2 = x2 * cos(theta) + x1 * sin(theta)

i.e. ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``. Hence
``<rot(q, i), rot(k, j)>`` depends only on ``i - j``. Angles are computed in fp32 (an fp16/bf16
position product would lose whole radians at long positions) and the rotation in fp32 or wider.
"""

from __future__ import annotations

import torch

from linmix.ops._checks import require_positive_int, require_shape

__all__ = ["rotary_dim_for", "rotary_cos_sin", "apply_rotary"]


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    """Rotary channels for a head of ``head_dim`` channels and a ``fraction`` in [0, 1].

    ``int(fraction * head_dim)``, as the BASED checkpoints compute it; must come out even.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rotary fraction must lie in [0, 1], got {fraction!r}")
    rotary_dim = int(fraction * head_dim)
    if rotary_dim % 2:
        raise ValueError(f"rotary dim int({fraction} * {head_dim}) = {rotary_dim} must be even")
    return rotary_dim


def rotary_cos_sin(
    positions: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles.

    positions: integer tensor ``[T]`` or ``[B, T]`` (absolute token positions).
    Returns ``(cos, sin)``, each ``[T, rotary_dim // 2]`` or ``[B, T, rotary_dim // 2]`` in
    ``dtype`` (fp32 by default; the angles themselves are always computed in fp32).
    """
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
        got = getattr(positions, "dtype", type(positions).__name__)
        raise ValueError(f"positions must be an integer tensor of shape [T] or [B, T], got {got}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must have shape [T] or [B, T], got shape {tuple(positions.shape)}")
    require_positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    if not base > 0:
        raise ValueError(f"rotary base must be positive, got {base!r}")
    device = positions.device if device is None else torch.device(device)
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    inverse_frequency = 1.0 / (float(base) ** exponents)
    angles = positions.to(device=device, dtype=torch.float32)[..., None] * inverse_frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of each head of ``x``.

    x: ``[B, T, H, D]``; cos, sin: ``[T, r/2]`` or ``[B, T, r/2]`` from :func:`rotary_cos_sin`.
    Returns a new tensor of x's shape and dtype (computed in fp32 for half inputs).
    """
    require_shape("x", x, "[B, T, H, D]", 4)
    batch, length, _, head_dim = x.shape
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(f"cos and sin must both have shape [T, r/2] or [B, T, r/2], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    half = cos.shape[-1]
    expected = ((length, half), (batch, length, half))
    if tuple(cos.shape) not in expected:
        raise ValueError(f"cos/sin must have shape [T, r/2] = {expected[0]} or [B, T, r/2] = {expected[1]}, got {tuple(cos.shape)}")
    if 2 * half > head_dim:
        raise ValueError(f"rotary dim {2 * half} exceeds the head dim D = {head_dim} of x [B, T, H, D]")
    compute = torch.promote_types(x.dtype, torch.float32)
    # [.., T, r/2] -> [B or 1, T, 1, r/2] to broadcast over heads.
    cos = (cos if cos.dim() == 3 else cos[None]).to(compute)[:, :, None, :]
    sin = (sin if sin.dim() == 3 else sin[None]).to(compute)[:, :, None, :]
    x1 = x[..., :half].to(compute)
    x2 = x[..., half : 2 * half].to(compute)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if 2 * half == head_dim:
        return rotated
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)

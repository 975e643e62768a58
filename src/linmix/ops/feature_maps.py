"""Feature maps for linear attention.

The 2nd-order Taylor map of BASED makes phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(f),
the Taylor expansion of exp(s). Layout: the feature dimension is the last one; any leading dims.
"""

from __future__ import annotations

import math

import torch

from linmix.ops._checks import require_floating


def taylor_feature_dim(head_dim: int, symmetric: bool = True) -> int:
    """Output width of :func:`taylor_feature_map` for inputs of width ``head_dim`` (f)."""
    return 1 + head_dim + (head_dim * (head_dim + 1) // 2 if symmetric else head_dim * head_dim)


_UPPER_INDEX_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _upper_triangle(f: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (f, str(device))
    if key not in _UPPER_INDEX_CACHE:
        rows, cols = torch.triu_indices(f, f, device=device)
        _UPPER_INDEX_CACHE[key] = (rows, cols)
    return _UPPER_INDEX_CACHE[key]


def taylor_feature_map(x: torch.Tensor, symmetric: bool = True, input_dim: int | None = None) -> torch.Tensor:
    """2nd-order Taylor feature map ``[..., f] -> [..., D']``.

    ``phi(x) = [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))]`` with ``D' = 1 + f + f^2`` (``symmetric=False``),
    or the compact form with ``D' = 1 + f + f(f+1)/2`` that keeps the diagonal of ``x x^T`` (scaled
    ``1 / (sqrt(2) sqrt(f))``) and its upper off-diagonal (scaled ``1 / sqrt(f)``): both give exactly
    ``phi(q) . phi(k) = 1 + s + s^2/2`` with ``s = q . k / sqrt(f)``.

    ``input_dim`` is the ``f`` used in the scales (the official config's ``feature_map.input_dim``);
    it defaults to the width of ``x``.
    """
    require_floating("x", x, "[..., f]")
    f = x.shape[-1]
    scale_dim = f if input_dim is None else input_dim
    # Build the features along a leading axis (row gathers and muls on contiguous rows are far
    # faster than gathering along the last axis), then hand back a [..., D'] view.
    rows_first = x.movedim(-1, 0).contiguous()
    if symmetric:
        rows, cols = _upper_triangle(f, x.device)
        diagonal = x.new_tensor(1.0 / math.sqrt(2.0 * scale_dim))
        off_diagonal = x.new_tensor(1.0 / math.sqrt(scale_dim))
        weights = torch.where(rows == cols, diagonal, off_diagonal).reshape((-1,) + (1,) * (x.dim() - 1))
        second = rows_first[rows] * (rows_first[cols] * weights)
    else:
        second = (rows_first.unsqueeze(1) * rows_first.unsqueeze(0)).flatten(0, 1) / math.sqrt(2.0 * scale_dim)
    features = torch.cat([torch.ones_like(rows_first[:1]), rows_first * scale_dim ** -0.25, second], dim=0)
    return features.movedim(0, -1)

"""Feature maps for linear attention.

The 2nd-order Taylor map of BASED makes phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(f),
the Taylor expansion of exp(s). Layout: the feature dimension is the last one; any leading dims.
"""

from __future__ import annotations

import torch

from linmix.ops._checks import require_floating


def taylor_feature_dim(head_dim: int, symmetric: bool = True) -> int:
    """Output width of :func:`taylor_feature_map` for inputs of width ``head_dim`` (f)."""
    return 1 + head_dim + (head_dim * (head_dim + 1) // 2 if symmetric else head_dim * head_dim)


_GATHER_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _gather_plan(f: int, symmetric: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (ia, ib) such that phi = A[ia] * B[ib], with the small stacks
    A = [1, x / f^(1/4), x] and B = [1, x / sqrt(f), x / sqrt(2 f)] (2f + 1 rows each).

    Row 0 is 1 * 1, rows 1..f are (x / f^(1/4)) * 1, a diagonal pair is x_i * x_i / sqrt(2 f) and an
    off-diagonal pair x_i * x_j / sqrt(f) (symmetric) — or every (i, j) times 1 / sqrt(2 f) (full).
    Two row gathers and one multiply then build all D' rows with no large concatenation.
    """
    key = (f, symmetric, str(device))
    if key not in _GATHER_CACHE:
        ia, ib = [0] + list(range(1, f + 1)), [0] * (f + 1)
        for i in range(f):
            for j in range(i if symmetric else 0, f):
                ia.append(1 + f + i)
                ib.append(1 + f + j if (i == j or not symmetric) else 1 + j)
        _GATHER_CACHE[key] = (torch.tensor(ia, device=device), torch.tensor(ib, device=device))
    return _GATHER_CACHE[key]


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
    return taylor_features_rows_first(x.movedim(-1, 0), symmetric, input_dim).movedim(0, -1)


def taylor_features_rows_first(x: torch.Tensor, symmetric: bool = True, input_dim: int | None = None) -> torch.Tensor:
    """:func:`taylor_feature_map` with the feature axis first: ``[f, ...] -> [D', ...]`` (contiguous).

    Building features along a leading axis is row gathers and multiplies on contiguous rows, far
    faster on CPU than gathering along the last axis; the chunked linear attention uses this form.
    """
    f = x.shape[0]
    scale_dim = f if input_dim is None else input_dim
    ones = torch.ones_like(x[:1])
    a = torch.cat([ones, x * scale_dim ** -0.25, x], dim=0)
    b = torch.cat([ones, x * scale_dim ** -0.5, x * (2.0 * scale_dim) ** -0.5], dim=0)
    ia, ib = _gather_plan(f, symmetric, x.device)
    return torch.index_select(a, 0, ia) * torch.index_select(b, 0, ib)

"""Vision-RWKV's quad-directional token shift (Q-Shift) and the token-shift mixes built on it.

Layout ``x: [B, T, C]`` with ``T = height * width`` tokens in row-major order (token ``h * width + w``
is grid cell ``(h, w)``). With ``g = C // 4``, :func:`q_shift` gives each token::

    channels [0, g)    the left neighbour   x[h, w - 1]
    channels [g, 2g)   the right neighbour  x[h, w + 1]
    channels [2g, 3g)  the one above        x[h - 1, w]
    channels [3g, 4g)  the one below        x[h + 1, w]
    channels [4g, C)   itself (when C is not a multiple of 4)

and 0 where the neighbour is outside the grid. :func:`shifted_mixes` forms Vision-RWKV's inputs
``x_i = mu_i x + (1 - mu_i) q_shift(x)`` (``torch.lerp(q_shift(x), x, mu_i)``) for several mix
vectors ``mu_i: [C]`` at once.

Forms:

- :func:`q_shift_reference`: zero-pad the grid by one cell and slice it (the test oracle);
- :func:`q_shift` ``form="buffer"``: each quarter written once into one output buffer, only the border
  rows / columns zeroed (half the memory traffic of pad + cat; the eager default);
- :func:`q_shift` ``form="concat"``: pad + cat of the four quarters, no in-place writes (what
  tracing, export and torch.compile use);
- :func:`shifted_mixes` on fp32 CPU tensors outside autograd: the native C kernel
  :func:`linmix.ops.native.q_shift_lerp_native` (the shift and every mix in one pass, x read once);
  the torch forms otherwise, and always while tracing, exporting or compiling (a graph never calls
  into ctypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops import dispatch, native
from linmix.ops._checks import require_positive_int, require_shape, tracing_or_exporting

__all__ = ["Q_SHIFT_FORMS", "q_shift", "q_shift_reference", "shifted_mixes"]

Q_SHIFT_FORMS = ("auto", "buffer", "concat")


def _check_grid(x: torch.Tensor, height: int, width: int) -> None:
    require_positive_int("height", height)
    require_positive_int("width", width)
    require_shape("x", x, "[B, T, C] with T = height * width", 3)
    if x.shape[1] != height * width:
        raise ValueError(f"x must have shape [B, T, C] with T = height * width = {height} * {width} = {height * width}, "
                         f"got {tuple(x.shape)}")


def q_shift_reference(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Q-Shift by slicing a zero-padded grid (the oracle): ``x [B, T, C] -> [B, T, C]``."""
    _check_grid(x, height, width)
    batch, length, channels = x.shape
    g = channels // 4
    # One zero cell on every side: cell (h, w) of the grid is padded[h + 1, w + 1].
    padded = F.pad(x.reshape(batch, height, width, channels), (0, 0, 1, 1, 1, 1))
    left = padded[:, 1:-1, :-2]
    right = padded[:, 1:-1, 2:]
    above = padded[:, :-2, 1:-1]
    below = padded[:, 2:, 1:-1]
    own = padded[:, 1:-1, 1:-1]
    pieces = [left[..., :g], right[..., g : 2 * g], above[..., 2 * g : 3 * g], below[..., 3 * g : 4 * g], own[..., 4 * g :]]
    return torch.cat(pieces, dim=-1).reshape(batch, length, channels)


def _q_shift_concat(grid: torch.Tensor, g: int) -> torch.Tensor:
    height, width = grid.shape[1], grid.shape[2]
    # F.pad's widths run from the last dim backwards: (C left, C right, W left, W right, H top, H bottom).
    left = F.pad(grid[:, :, : width - 1, 0:g], (0, 0, 1, 0))
    right = F.pad(grid[:, :, 1:, g : 2 * g], (0, 0, 0, 1))
    above = F.pad(grid[:, : height - 1, :, 2 * g : 3 * g], (0, 0, 0, 0, 1, 0))
    below = F.pad(grid[:, 1:, :, 3 * g : 4 * g], (0, 0, 0, 0, 0, 1))
    return torch.cat([left, right, above, below, grid[..., 4 * g :]], dim=-1)


def _q_shift_buffer(grid: torch.Tensor, g: int) -> torch.Tensor:
    shifted = torch.empty_like(grid)
    shifted[:, :, 1:, 0:g] = grid[:, :, :-1, 0:g]
    shifted[:, :, :1, 0:g] = 0
    shifted[:, :, :-1, g : 2 * g] = grid[:, :, 1:, g : 2 * g]
    shifted[:, :, -1:, g : 2 * g] = 0
    shifted[:, 1:, :, 2 * g : 3 * g] = grid[:, :-1, :, 2 * g : 3 * g]
    shifted[:, :1, :, 2 * g : 3 * g] = 0
    shifted[:, :-1, :, 3 * g : 4 * g] = grid[:, 1:, :, 3 * g : 4 * g]
    shifted[:, -1:, :, 3 * g : 4 * g] = 0
    shifted[..., 4 * g :] = grid[..., 4 * g :]
    return shifted


def q_shift(x: torch.Tensor, height: int, width: int, *, form: str = "auto") -> torch.Tensor:
    """Q-Shift (see the module docstring): ``x [B, T, C] -> [B, T, C]``, T = height * width row-major.

    ``form``: "buffer" (eager), "concat" (no in-place writes: for tracing, export and compile) or
    "auto" (concat while tracing, exporting or compiling, buffer otherwise). Differentiable.
    """
    if form not in Q_SHIFT_FORMS:
        raise ValueError(f"form must be one of {Q_SHIFT_FORMS}, got {form!r}")
    _check_grid(x, height, width)
    batch, length, channels = x.shape
    grid = x.reshape(batch, height, width, channels)
    if form == "concat" or (form == "auto" and tracing_or_exporting(x)):
        shifted = _q_shift_concat(grid, channels // 4)
    else:
        shifted = _q_shift_buffer(grid, channels // 4)
    return shifted.reshape(batch, length, channels)


def _check_mixes(x: torch.Tensor, mixes: tuple[torch.Tensor, ...]) -> None:
    if not mixes:
        raise ValueError("shifted_mixes needs at least one mix vector mu of shape [C]")
    channels = x.shape[-1]
    for i, mu in enumerate(mixes):
        require_shape(f"mixes[{i}]", mu, f"[C] = [{channels}]", 1)
        if mu.shape[0] != channels:
            raise ValueError(f"mixes[{i}] must have shape [C] = [{channels}] (C from x: {tuple(x.shape)}), got {tuple(mu.shape)}")


def shifted_mixes(x: torch.Tensor, height: int, width: int, *mixes: torch.Tensor, backend: str = "auto") -> list[torch.Tensor]:
    """``[torch.lerp(q_shift(x, height, width), x, mu) for mu in mixes]``: ``mu x + (1 - mu) q_shift(x)``.

    ``x: [B, T, C]``, each ``mu: [C]`` -> a list of ``[B, T, C]``. ``backend``: "auto" (the native C
    kernel for fp32 CPU tensors outside autograd, tracing and compiling, where it builds and
    ``LINMIX_FORCE_REFERENCE`` is unset; torch otherwise), "torch", or "native" (forced; an error
    where it cannot run).
    """
    dispatch.check_backend(backend, ("auto", "torch", "native"))
    _check_grid(x, height, width)
    _check_mixes(x, mixes)
    if backend == "native":
        reasons = native.ineligible(x, *mixes)
        if reasons:
            raise ValueError("backend='native' needs " + ", ".join(reasons))
        if not native.available():
            raise RuntimeError(f"backend='native' requested but the native CPU kernels are unavailable: {native.unavailable_reason()}")
    if backend == "native" or (backend == "auto" and native.usable(x, *mixes)):
        return list(native.q_shift_lerp_native(x, height, width, torch.stack(mixes)).unbind(0))
    shifted = q_shift(x, height, width)
    return [torch.lerp(shifted, x, mu) for mu in mixes]

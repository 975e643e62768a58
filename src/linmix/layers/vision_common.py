"""Pieces shared by the vision token mixers (Vision-RWKV, and any other mixer over a token grid):
stochastic depth, and the checks of a ``[B, T, C]`` token grid and of a block's depth index.

Token tensors are ``[B, T, C]`` with ``T = height * width`` in row-major order (token ``h * width + w``
is grid cell ``(h, w)``).
"""

from __future__ import annotations

import torch
from torch import nn

from linmix.ops._checks import require_positive_int, require_shape

__all__ = ["DropPath", "check_grid_tokens", "check_layer_index"]


def check_layer_index(layer_id, depth) -> None:
    """Raise ValueError unless ``depth`` is a positive int and ``layer_id`` an int in ``[0, depth)``."""
    require_positive_int("depth", depth)
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < depth:
        raise ValueError(f"layer_id must be an integer in [0, depth) = [0, {depth}), got {layer_id!r}")


def check_grid_tokens(x: torch.Tensor, channels: int, height: int, width: int) -> None:
    """Raise ValueError unless ``x`` is a floating ``[B, T, C]`` with ``T = height * width`` and ``C = channels``.

    Reads shapes only (never values), so it costs nothing in a traced or compiled graph.
    """
    require_shape("x", x, f"[B, T, C] with T = height * width and C = {channels}", 3)
    if x.shape[1] != height * width or x.shape[2] != channels:
        raise ValueError(
            f"x must have shape [B, T, C] with T = height * width = {height} * {width} = {height * width} "
            f"and C = {channels}, got {tuple(x.shape)}"
        )


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability ``p``
    (and scale the kept ones by ``1 / (1 - p)``); the identity in evaluation or at ``p = 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"

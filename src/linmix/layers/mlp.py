"""Gated SiLU MLP ("SwiGLU") as in BASED: fc1 d -> 2*hidden split into (value, gate), fc2(value * silu(gate))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    """x [..., d] -> [..., d]. ``hidden_features`` defaults to 2*d and is rounded up to ``multiple_of``
    (the official models round n_inner up to a multiple of 256)."""

    def __init__(self, d_model: int, hidden_features: int | None = None, *, multiple_of: int = 1,
                 fc1_bias: bool = False, fc2_bias: bool = False):
        super().__init__()
        hidden = hidden_features if hidden_features is not None else 2 * d_model
        hidden = -(-hidden // multiple_of) * multiple_of
        self.d_model = d_model
        self.hidden_features = hidden
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=fc1_bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"GatedMLP expects x of shape [..., {self.d_model}], got {tuple(x.shape)}")
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))

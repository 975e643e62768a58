"""Small building blocks shared by the SAM-style modules: channels-first LayerNorm and a 2-layer MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linmix.ops._checks import accumulation_dtype

__all__ = ["LayerNorm2d", "MLPBlock"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of a channels-first map: x [B, C, H, W] -> [B, C, H, W].

    ``y = (x - mean_c) / sqrt(var_c + eps) * weight[c] + bias[c]`` with the biased variance, as in
    SAM's ``LayerNorm2d`` (parameter names ``weight`` / ``bias``, eps 1e-6). Half-precision inputs
    are normalised in fp32 and returned in their own dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"LayerNorm2d expects x of shape [B, {self.weight.shape[0]}, H, W], got {tuple(x.shape)}"
            )
        compute = accumulation_dtype(x.dtype)
        # One fused layer_norm over the channels of the NHWC view (a free view for channels-last
        # maps), about twice as fast on CPU as mean / var / rsqrt passes over NCHW.
        normed = F.layer_norm(
            x.to(compute).permute(0, 2, 3, 1), (x.shape[1],), self.weight.to(compute), self.bias.to(compute), self.eps
        )
        return normed.permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: x [..., embedding_dim] -> [..., embedding_dim] (SAM's ``MLPBlock`` keys)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))

"""Small building blocks shared by the SAM-style modules: channels-first LayerNorm and a 2-layer MLP."""

from __future__ import annotations

import torch
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
        wide = x.to(compute)
        mean = wide.mean(dim=1, keepdim=True)
        variance = (wide - mean).pow(2).mean(dim=1, keepdim=True)
        normed = (wide - mean) * torch.rsqrt(variance + self.eps)
        weight = self.weight.to(compute)[:, None, None]
        bias = self.bias.to(compute)[:, None, None]
        return (normed * weight + bias).to(x.dtype)

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

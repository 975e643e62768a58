"""RMSNorm (weight, no bias), computed in fp32 for half-precision inputs."""

from __future__ import annotations

import torch
from torch import nn

from linmix.ops._checks import accumulation_dtype


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim; x [..., d] -> [..., d] (same dtype)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expects x of shape [..., {self.weight.shape[0]}], got {tuple(x.shape)}")
        compute = accumulation_dtype(x.dtype)
        wide = x.to(compute)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

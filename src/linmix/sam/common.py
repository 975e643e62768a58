"""Small building blocks shared by the SAM-style modules: channels-first LayerNorm, a 2-layer MLP,
and a conv + GELU that runs as one oneDNN call in CPU inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linmix.ops._checks import accumulation_dtype, tracing_or_exporting

__all__ = ["LayerNorm2d", "MLPBlock", "conv2d_gelu"]

# oneDNN convolution with a fused eltwise post-op (what torch.compile's CPU backend emits). Whether
# it exists is decided once, at import: torch.backends.mkldnn.is_available() is a call that
# torch.compile refuses to trace, so asking it per call would break a compiled encoder's graph at
# every conv.
_FUSED_CONV = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_FUSED_CONV_AVAILABLE = _FUSED_CONV is not None and torch.backends.mkldnn.is_available()


def _can_fuse(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    if tracing_or_exporting(x):  # first: a traced graph takes the plain form (the compiler fuses it itself)
        return False
    return (
        _FUSED_CONV_AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32 == conv.weight.dtype
        and x.dim() == 4
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
    )


def conv2d_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``F.gelu(conv(x))`` (exact erf GELU). In fp32 CPU inference it is one oneDNN convolution with a
    GELU post-op: the activation is applied while the output is still in cache, instead of one more
    pass over a map that is up to 256 x 512 x 512 in the 1024 px encoder. Training, other dtypes and
    devices, and tracing / export / torch.compile take the plain two-op form (same values to fp32
    rounding)."""
    if _can_fuse(x, conv):
        return _FUSED_CONV(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                           conv.groups, "gelu", [], "none")
    return F.gelu(conv(x))


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

"""Vision-RWKV token mixing layers: spatial mix, channel mix and the pre-norm block that holds them.

Tokens are ``[B, T, C]`` with ``T = height * width`` in row-major order; every layer takes
``(x, height, width)``. The block (spec RWKV-SAM section 2)::

    x = x + gamma1 * SpatialMix(LN1(x)),   x = x + gamma2 * ChannelMix(LN2(x))
    SpatialMix: out = W_o(sigmoid(r) * bi_wkv(w / T, u / T, k, v)),  k, v, r = W_{k,v,r} x_{k,v,r}
    ChannelMix: out = sigmoid(W_r x_r) * W_v(relu(W_k x_k)^2)
    x_* = mu_* x + (1 - mu_*) q_shift(x)

``w`` (``spatial_decay``) is used as is, without exp, and may be negative. Parameter names follow
the official Vision-RWKV checkpoints (``att.spatial_decay``, ``ffn.key.weight``, ``gamma1``, ...).

The ops are :func:`linmix.ops.q_shift.shifted_mixes` and :func:`linmix.ops.wkv.bi_wkv`. In fp32 CPU
inference the layers run native C kernels (:mod:`linmix.ops.native`): the shift and its mixes in one
pass, Bi-WKV with the receptance gate fused, the channel mix's elementwise steps in place. Under
autograd, other dtypes and devices, and while tracing, exporting or compiling they take the torch
path (the choice is made before anything is traced: a compiled block is one graph).
"""

from __future__ import annotations

import torch
from torch import nn

from linmix.layers.rwkv import rwkv_fancy_init
from linmix.layers.vision_common import DropPath, check_grid_tokens, check_layer_index
from linmix.ops import native
from linmix.ops._checks import require_positive_int
from linmix.ops.q_shift import shifted_mixes
from linmix.ops.wkv import bi_wkv, native_bi_wkv_applies

__all__ = ["VRWKVBlock", "VRWKVChannelMix", "VRWKVSpatialMix"]


class VRWKVSpatialMix(nn.Module):
    """Vision-RWKV spatial mix: ``x [B, T, C], height, width -> [B, T, C]``.

    ``out = output(sigmoid(r) * bi_wkv(spatial_decay / T, spatial_first / T, k, v))`` with
    ``k, v, r = key(x_k), value(x_v), receptance(x_r)`` (bias-free C -> C) and
    ``x_* = spatial_mix_* x + (1 - spatial_mix_*) q_shift(x)``.

    Fancy init (:func:`linmix.layers.rwkv.rwkv_fancy_init`; ``r0, r1`` the depth ratios, ``x_c = c / C``):
    ``spatial_decay[c] = -5 + 8 (c / (C - 1))^(0.7 + 1.3 r0)``,
    ``spatial_first[c] = ln(0.3) + 0.5 ((c + 1) % 3 - 1)``,
    ``mix_k = x^r1``, ``mix_v = x^r1 + 0.3 r0``, ``mix_r = x^(0.5 r1)``.
    """

    def __init__(self, dim: int, layer_id: int = 0, depth: int = 1, *, wkv_chunk_size: int = 64):
        super().__init__()
        require_positive_int("dim", dim)
        check_layer_index(layer_id, depth)
        self.dim, self.layer_id, self.depth = dim, layer_id, depth
        self.wkv_chunk_size = wkv_chunk_size
        self.spatial_decay = nn.Parameter(torch.empty(dim))
        self.spatial_first = nn.Parameter(torch.empty(dim))
        self.spatial_mix_k = nn.Parameter(torch.empty(dim))
        self.spatial_mix_v = nn.Parameter(torch.empty(dim))
        self.spatial_mix_r = nn.Parameter(torch.empty(dim))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.reset_mix_parameters()

    @torch.no_grad()
    def reset_mix_parameters(self) -> None:
        """The fancy (depth-dependent) init of decay, bonus and shift mixes; the linears keep PyTorch's."""
        init = rwkv_fancy_init(self.dim, self.layer_id, self.depth)
        self.spatial_decay.copy_(init["decay"])
        self.spatial_first.copy_(init["first"])
        for name in ("mix_k", "mix_v", "mix_r"):
            getattr(self, "spatial_" + name).copy_(init[name])

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        check_grid_tokens(x, self.dim, height, width)
        x_k, x_v, x_r = shifted_mixes(x, height, width, self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r)
        k, v, r = self.key(x_k), self.value(x_v), self.receptance(x_r)
        length = x.shape[1]
        decay, first = self.spatial_decay / length, self.spatial_first / length
        if native.usable(r) and native_bi_wkv_applies(decay, first, k, v):
            return self.output(native.bi_wkv_native(decay, first, k, v, gate=r))  # the gate in the same pass
        wkv = bi_wkv(decay, first, k, v, chunk_size=self.wkv_chunk_size)
        return self.output(torch.sigmoid(r) * wkv.to(r.dtype))


class VRWKVChannelMix(nn.Module):
    """Vision-RWKV channel mix: ``x [B, T, C], height, width -> [B, T, C]``.

    ``out = sigmoid(receptance(x_r)) * value(relu(key(x_k))^2)`` with key C -> hidden_ratio C,
    value back to C, receptance C -> C, all bias-free; ``x_* = spatial_mix_* x + (1 - spatial_mix_*) q_shift(x)``.
    Fancy init: ``spatial_mix_k = spatial_mix_r = (c / C)^r1``.
    """

    def __init__(self, dim: int, layer_id: int = 0, depth: int = 1, *, hidden_ratio: int = 2):
        super().__init__()
        require_positive_int("dim", dim)
        require_positive_int("hidden_ratio", hidden_ratio)
        check_layer_index(layer_id, depth)
        self.dim, self.layer_id, self.depth = dim, layer_id, depth
        hidden = hidden_ratio * dim
        self.spatial_mix_k = nn.Parameter(torch.empty(dim))
        self.spatial_mix_r = nn.Parameter(torch.empty(dim))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.reset_mix_parameters()

    @torch.no_grad()
    def reset_mix_parameters(self) -> None:
        init = rwkv_fancy_init(self.dim, self.layer_id, self.depth)
        self.spatial_mix_k.copy_(init["mix_k"])
        self.spatial_mix_r.copy_(init["mix_k"])  # channel mix: mu_k = mu_r = x^r1

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        check_grid_tokens(x, self.dim, height, width)
        x_k, x_r = shifted_mixes(x, height, width, self.spatial_mix_k, self.spatial_mix_r)
        hidden, gate = self.key(x_k), self.receptance(x_r)
        if native.usable(hidden, gate):  # in place, one pass each
            return native.sigmoid_mul_(self.value(native.relu_square_(hidden)), gate)
        return torch.sigmoid(gate) * self.value(torch.square(torch.relu(hidden)))


class VRWKVBlock(nn.Module):
    """Pre-norm Vision-RWKV block with layer scale: ``x [B, T, C], height, width -> [B, T, C]``::

        x = x + DropPath(gamma1 * att(ln1(x)))
        x = x + DropPath(gamma2 * ffn(ln2(x)))

    ``ln1, ln2``: LayerNorm(eps 1e-6); ``gamma1, gamma2`` start at ``layer_scale_init``;
    ``att``: :class:`VRWKVSpatialMix`, ``ffn``: :class:`VRWKVChannelMix` (hidden = mlp_ratio * dim).
    """

    def __init__(
        self,
        dim: int,
        layer_id: int,
        depth: int,
        mlp_ratio: int = 2,
        layer_scale_init: float = 1e-2,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.att = VRWKVSpatialMix(dim, layer_id, depth)
        self.ffn = VRWKVChannelMix(dim, layer_id, depth, hidden_ratio=mlp_ratio)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.drop_path.p == 0.0 or not self.training:  # fused residual update
            x = torch.addcmul(x, self.gamma1, self.att(self.ln1(x), height, width))
            return torch.addcmul(x, self.gamma2, self.ffn(self.ln2(x), height, width))
        x = x + self.drop_path(self.gamma1 * self.att(self.ln1(x), height, width))
        return x + self.drop_path(self.gamma2 * self.ffn(self.ln2(x), height, width))

"""RWKV-SAM image encoder: convolutional stages, then Vision-RWKV token blocks, then SAM's neck.

Layout (spec RWKV-SAM section 1, the "ViTamin" layout), for an input ``x: [B, 3, H, W]`` with H and
W divisible by 16 (``C1, C2, D`` are the variant's stage-1, stage-2 and token widths)::

    stem      conv3x3 s2 (3 -> C0, bias) -> LayerNorm2d + GELU -> conv3x3 s1 (C0 -> C0)     H/2
    stage 1   2 MBConv (C0 -> C1), the first with stride 2                               H/4  (C1)
    stage 2   4 MBConv (C1 -> C2), the first with stride 2                               H/8  (C2)
    strided   LayerNorm2d(C2) -> conv3x3 s2 (C2 -> D)                                    H/16 (D)
    tokens    14 blocks on the row-major H/16 x W/16 grid (Vision-RWKV, or global attention for
              the same-scale transformer baseline), then LayerNorm(eps 1e-6); no position embedding
    neck      conv1x1 (D -> 256, no bias) -> LayerNorm2d -> conv3x3 (no bias) -> LayerNorm2d

Token tensors are ``[B, T, C]`` with ``T = height * width`` in row-major order (token ``h * width + w``
is pixel ``(h, w)``); maps are ``[B, C, H, W]``.

The Vision-RWKV block (spec section 2)::

    x = x + gamma1 * SpatialMix(LN1(x)),   x = x + gamma2 * ChannelMix(LN2(x))
    SpatialMix: out = W_o(sigmoid(r) * bi_wkv(w / T, u / T, k, v)),  k, v, r = W_{k,v,r} x_{k,v,r}
    ChannelMix: out = sigmoid(W_r x_r) * W_v(relu(W_k x_k)^2)
    x_* = mu_* x + (1 - mu_*) q_shift(x)

``w`` (``spatial_decay``) is used as is, without exp, and may be negative.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from linmix.ops._checks import require_positive_int, require_shape, tracing_or_exporting
from linmix.layers.rwkv import rwkv_fancy_init
from linmix.layers.vision_mamba import VISION_MAMBA_MIXERS, VisionMambaBlock
from linmix.ops import native
from linmix.ops.wkv import bi_wkv, native_bi_wkv_applies
from linmix.sam.common import LayerNorm2d, conv2d_gelu  # SAM's channels-first LayerNorm (eps 1e-6), shared with the decoder

__all__ = [
    "BACKBONE_VARIANTS",
    "TOKEN_MIXERS",
    "AttentionBlock",
    "BackboneFeatures",
    "BackboneVariant",
    "DropPath",
    "GeGluMlp",
    "ImageEncoderOutput",
    "LayerNorm2d",
    "MBConv",
    "Neck",
    "RwkvSamBackbone",
    "RwkvSamImageEncoder",
    "SelfAttention",
    "Stem",
    "StridedConv",
    "VRWKVBlock",
    "VRWKVChannelMix",
    "VRWKVSpatialMix",
    "q_shift",
    "shifted_mixes",
]

PATCH_SIZE = 16  # total stride of the backbone: tokens and the embedding are H/16 x W/16


class BackboneVariant(NamedTuple):
    stem_width: int
    stage1_width: int
    stage2_width: int
    token_width: int
    token_depth: int = 14
    stage1_depth: int = 2
    stage2_depth: int = 4


BACKBONE_VARIANTS: dict[str, BackboneVariant] = {
    "tiny": BackboneVariant(32, 32, 64, 192),
    "small": BackboneVariant(64, 64, 128, 384),
    "base": BackboneVariant(128, 128, 256, 768),
    "large": BackboneVariant(160, 160, 320, 1024),
}
TOKEN_MIXERS = ("rwkv", "attention", "mamba", "mamba_bi")


def _check_layer_index(layer_id, depth) -> None:
    require_positive_int("depth", depth)
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < depth:
        raise ValueError(f"layer_id must be an integer in [0, depth) = [0, {depth}), got {layer_id!r}")


def _check_tokens(x: torch.Tensor, channels: int, height: int, width: int) -> None:
    require_shape("x", x, f"[B, T, C] with T = height * width and C = {channels}", 3)
    if x.shape[1] != height * width or x.shape[2] != channels:
        raise ValueError(
            f"x must have shape [B, T, C] with T = height * width = {height} * {width} = {height * width} "
            f"and C = {channels}, got {tuple(x.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# small building blocks


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


def _init_conv(module: nn.Conv2d) -> None:
    """He-normal on fan-out (fan-out divided by groups, so depthwise convs get their own scale), zero bias."""
    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# convolutional stages


class Stem(nn.Module):
    """``[B, in, H, W] -> [B, out, H/2, W/2]``: conv3x3 s2 (bias) -> LayerNorm2d + GELU -> conv3x3 s1 (bias).

    The first conv's bias starts small and random (PyTorch's default uniform bound), not zero: SAM
    frames are zero-padded, and with a zero bias every padded pixel gives LayerNorm2d exactly constant
    channels, whose backward multiplies by 1 / sqrt(eps) = 1000; from-scratch training then sees stem
    gradients near 1e22 and an infinite clipping norm. Any spread across channels bounds that factor.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        for conv in (self.conv1, self.conv2):
            _init_conv(conv)
        bound = 1.0 / math.sqrt(in_channels * 3 * 3)
        nn.init.uniform_(self.conv1.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.norm1(self.conv1(x))))


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck, ``[B, in, H, W] -> [B, out, H/s, W/s]`` (s = stride, 1 or 2)::

        branch   = DropPath(1x1(4 out -> out)(GELU(dw3x3 s(GELU(1x1(in -> 4 out)(LN2d(x)))))))
        shortcut = [AvgPool2d(3, 2, pad 1, count_include_pad=False) if s = 2] then [1x1 if in != out]

    All convs have biases.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, expand_ratio: int = 4, drop_path: float = 0.0):
        super().__init__()
        require_positive_int("in_channels", in_channels)
        require_positive_int("out_channels", out_channels)
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride!r}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        hidden = out_channels * expand_ratio
        self.shortcut_pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False) if stride == 2 else nn.Identity()
        self.shortcut_proj = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.pre_norm = LayerNorm2d(in_channels)
        self.conv1_1x1 = nn.Conv2d(in_channels, hidden, 1)
        self.conv2_kxk = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden)
        self.conv3_1x1 = nn.Conv2d(hidden, out_channels, 1)
        self.drop_path = DropPath(drop_path)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _init_conv(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_proj(self.shortcut_pool(x))
        x = conv2d_gelu(self.pre_norm(x), self.conv1_1x1)
        x = conv2d_gelu(x, self.conv2_kxk)
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class StridedConv(nn.Module):
    """``[B, in, H, W] -> [B, out, H/2, W/2]``: LayerNorm2d(in) -> conv3x3 s2 (bias). Turns stage 2 into tokens."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = LayerNorm2d(in_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        _init_conv(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


# --------------------------------------------------------------------------------------------------
# Vision-RWKV token blocks


def q_shift(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Vision-RWKV's quad-directional token shift. ``x [B, T, C] -> [B, T, C]``, T = height * width row-major.

    With ``g = C // 4``: channels ``[0, g)`` of token (h, w) take the left neighbour ``x[h, w-1]``,
    ``[g, 2g)`` the right one ``x[h, w+1]``, ``[2g, 3g)`` the one above ``x[h-1, w]`` and ``[3g, 4g)``
    the one below ``x[h+1, w]``; a neighbour outside the grid is 0. Channels ``[4g, C)`` pass through.
    """
    require_positive_int("height", height)
    require_positive_int("width", width)
    require_shape("x", x, "[B, T, C] with T = height * width", 3)
    batch, length, channels = x.shape
    if length != height * width:
        raise ValueError(f"x must have shape [B, T, C] with T = height * width = {height} * {width} = {height * width}, got {tuple(x.shape)}")
    g = channels // 4
    grid = x.reshape(batch, height, width, channels)
    if tracing_or_exporting(x):
        # F.pad's widths run from the last dim backwards: (C left, C right, W left, W right, H top, H bottom).
        left = F.pad(grid[:, :, : width - 1, 0:g], (0, 0, 1, 0))
        right = F.pad(grid[:, :, 1:, g : 2 * g], (0, 0, 0, 1))
        above = F.pad(grid[:, : height - 1, :, 2 * g : 3 * g], (0, 0, 0, 0, 1, 0))
        below = F.pad(grid[:, 1:, :, 3 * g : 4 * g], (0, 0, 0, 0, 0, 1))
        shifted = torch.cat([left, right, above, below, grid[..., 4 * g :]], dim=-1)
        return shifted.reshape(batch, length, channels)
    # Eager: write each quarter once into one buffer and zero only the border rows / columns
    # (half the memory traffic of pad + cat, which matters on CPU).
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
    return shifted.reshape(batch, length, channels)


def shifted_mixes(x: torch.Tensor, height: int, width: int, *mixes: torch.Tensor) -> list[torch.Tensor]:
    """``[torch.lerp(q_shift(x, height, width), x, mu) for mu in mixes]``, i.e. ``mu x + (1 - mu) shifted``.

    In fp32 CPU inference this is one native pass (:func:`linmix.ops.native.q_shift_lerp_native`):
    x is read once and the shifted map never materialised, instead of a shift plus one lerp per mix.
    """
    if native.usable(x, *mixes):
        return list(native.q_shift_lerp_native(x, height, width, torch.stack(mixes)).unbind(0))
    shifted = q_shift(x, height, width)
    return [torch.lerp(shifted, x, mu) for mu in mixes]


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
        _check_layer_index(layer_id, depth)
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
        _check_tokens(x, self.dim, height, width)
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
        _check_layer_index(layer_id, depth)
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
        _check_tokens(x, self.dim, height, width)
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


# --------------------------------------------------------------------------------------------------
# same-scale transformer baseline


class SelfAttention(nn.Module):
    """Global multi-head self-attention over all tokens: ``x [B, T, C] -> [B, T, C]`` (qkv and proj with bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        require_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, head_dim]
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class GeGluMlp(nn.Module):
    """``w2(GELU(w0(x)) * w1(x))``: ``x [..., C] -> [..., C]``, hidden = ratio * C, with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class AttentionBlock(nn.Module):
    """The same-scale transformer block, with the RWKV block's interface and layer scale::

        x = x + DropPath(gamma1 * attn(ln1(x)));  x = x + DropPath(gamma2 * ffn(ln2(x)))

    ``attn``: global :class:`SelfAttention` (``num_heads`` defaults to dim / 64); ``ffn``: :class:`GeGluMlp`.
    ``height, width`` are accepted for interface parity and only checked.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        mlp_ratio: int = 2,
        layer_scale_init: float = 1e-2,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads if num_heads is not None else max(1, dim // 64))
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = GeGluMlp(dim, mlp_ratio * dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        _check_tokens(x, self.dim, height, width)
        x = x + self.drop_path(self.gamma1 * self.attn(self.ln1(x)))
        return x + self.drop_path(self.gamma2 * self.ffn(self.ln2(x)))


# --------------------------------------------------------------------------------------------------
# backbone, neck, image encoder


class BackboneFeatures(NamedTuple):
    """stage1 ``[B, C1, H/4, W/4]``, stage2 ``[B, C2, H/8, W/8]``, tokens ``[B, D, H/16, W/16]`` (after the final norm)."""

    stage1: torch.Tensor
    stage2: torch.Tensor
    tokens: torch.Tensor


def _check_image(x: torch.Tensor, in_channels: int) -> None:
    require_shape("x", x, f"[B, {in_channels}, H, W] with H and W divisible by {PATCH_SIZE}", 4)
    batch, channels, height, width = x.shape
    if channels != in_channels:
        raise ValueError(f"x must have shape [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if height == 0 or width == 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(
            f"x must have shape [B, {in_channels}, H, W] with H and W positive multiples of {PATCH_SIZE} "
            f"(pad the image first), got H={height}, W={width}"
        )


class RwkvSamBackbone(nn.Module):
    """Conv stem and stages, then 14 token blocks: ``x [B, 3, H, W] -> BackboneFeatures``.

    ``variant``: one of :data:`BACKBONE_VARIANTS` (tiny, small, base, large). ``token_mixer``: "rwkv"
    (Vision-RWKV blocks, the paper's model), "attention" (global self-attention, the same-scale
    transformer baseline), "mamba" (VMamba's SS2D) or "mamba_bi" (a Vim-style bidirectional scan),
    see :mod:`linmix.layers.vision_mamba`. ``drop_path_rate`` rises linearly from 0 over the token blocks.
    ``gradient_checkpointing = True`` recomputes each token block in backward (training at 1024^2).
    """

    def __init__(
        self,
        variant: str = "small",
        token_mixer: str = "rwkv",
        *,
        in_channels: int = 3,
        mlp_ratio: int = 2,
        layer_scale_init: float = 1e-2,
        drop_path_rate: float = 0.0,
        num_heads: int | None = None,
    ):
        super().__init__()
        if variant not in BACKBONE_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(BACKBONE_VARIANTS)}, got {variant!r}")
        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"token_mixer must be one of {TOKEN_MIXERS}, got {token_mixer!r}")
        self.variant, self.token_mixer, self.in_channels = variant, token_mixer, in_channels
        config = BACKBONE_VARIANTS[variant]
        self.config = config
        self.embed_dim = config.token_width
        self.gradient_checkpointing = False

        self.stem = Stem(in_channels, config.stem_width)
        self.stage1 = nn.Sequential(
            *(MBConv(config.stem_width if i == 0 else config.stage1_width, config.stage1_width, 2 if i == 0 else 1) for i in range(config.stage1_depth))
        )
        self.stage2 = nn.Sequential(
            *(MBConv(config.stage1_width if i == 0 else config.stage2_width, config.stage2_width, 2 if i == 0 else 1) for i in range(config.stage2_depth))
        )
        self.strided_conv = StridedConv(config.stage2_width, config.token_width)

        depth = config.token_depth
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        if token_mixer == "rwkv":
            blocks = [
                VRWKVBlock(config.token_width, i, depth, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=rates[i])
                for i in range(depth)
            ]
        elif token_mixer in VISION_MAMBA_MIXERS:
            blocks = [
                VisionMambaBlock(config.token_width, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=rates[i],
                                 **VISION_MAMBA_MIXERS[token_mixer])
                for i in range(depth)
            ]
        else:
            blocks = [
                AttentionBlock(config.token_width, num_heads, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=rates[i])
                for i in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(config.token_width, eps=1e-6)

    @property
    def stage_channels(self) -> tuple[int, int, int]:
        """Channels of (stage1, stage2, tokens)."""
        return self.config.stage1_width, self.config.stage2_width, self.config.token_width

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        _check_image(x, self.in_channels)
        stage1 = self.stage1(self.stem(x))
        stage2 = self.stage2(stage1)
        grid = self.strided_conv(stage2)
        batch, dim, height, width = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)  # [B, T, D], row-major
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, height, width, use_reentrant=False)
            else:
                tokens = block(tokens, height, width)
        tokens = self.final_norm(tokens)
        return BackboneFeatures(stage1, stage2, tokens.transpose(1, 2).reshape(batch, dim, height, width))


class Neck(nn.Sequential):
    """SAM's neck: ``[B, in_dim, h, w] -> [B, out_dim, h, w]``.

    conv1x1 (no bias) -> LayerNorm2d -> conv3x3 (pad 1, no bias) -> LayerNorm2d; state-dict keys
    ``0.weight``, ``1.{weight,bias}``, ``2.weight``, ``3.{weight,bias}`` as SAM's ``neck.*``.
    """

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__(
            nn.Conv2d(in_dim, out_dim, 1, bias=False),
            LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
            LayerNorm2d(out_dim),
        )


class ImageEncoderOutput(NamedTuple):
    """embedding ``[B, 256, H/16, W/16]`` (SAM's image embedding), stage1 ``[B, C1, H/4, W/4]`` and
    stage2 ``[B, C2, H/8, W/8]`` (for the high-quality decoder)."""

    embedding: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor


class RwkvSamImageEncoder(nn.Module):
    """Backbone + neck: ``x [B, 3, H, W]`` (normalised, H and W multiples of 16) -> :class:`ImageEncoderOutput`."""

    def __init__(self, variant: str = "small", token_mixer: str = "rwkv", *, out_dim: int = 256, **backbone_kwargs):
        super().__init__()
        self.backbone = RwkvSamBackbone(variant, token_mixer, **backbone_kwargs)
        self.neck = Neck(self.backbone.embed_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> ImageEncoderOutput:
        features = self.backbone(x)
        return ImageEncoderOutput(self.neck(features.tokens), features.stage1, features.stage2)

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

The token blocks are layers: the Vision-RWKV block (spec section 2) is
:class:`linmix.layers.vision_rwkv.VRWKVBlock` (its op :func:`linmix.ops.q_shift.q_shift` and the
layer classes are re-exported here). :data:`TOKEN_BLOCK_BUILDERS` maps each ``token_mixer`` name to
the function that builds its block; a new token mixer is one more entry there.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from linmix.layers.vision_common import DropPath, check_grid_tokens
from linmix.layers.vision_mamba import VISION_MAMBA_MIXERS, VisionMambaBlock
from linmix.layers.vision_rwkv import VRWKVBlock, VRWKVChannelMix, VRWKVSpatialMix
from linmix.ops._checks import require_positive_int, require_shape
from linmix.ops.q_shift import q_shift, shifted_mixes
from linmix.sam.common import LayerNorm2d, conv2d_gelu  # SAM's channels-first LayerNorm (eps 1e-6), shared with the decoder

__all__ = [
    "BACKBONE_VARIANTS",
    "TOKEN_BLOCK_BUILDERS",
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


# --------------------------------------------------------------------------------------------------
# small building blocks


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
        check_grid_tokens(x, self.dim, height, width)
        x = x + self.drop_path(self.gamma1 * self.attn(self.ln1(x)))
        return x + self.drop_path(self.gamma2 * self.ffn(self.ln2(x)))


# --------------------------------------------------------------------------------------------------
# token mixer name -> block


def _rwkv_block(dim: int, layer_id: int, depth: int, *, mlp_ratio: int, layer_scale_init: float, drop_path: float,
                num_heads: int | None) -> nn.Module:
    return VRWKVBlock(dim, layer_id, depth, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=drop_path)


def _attention_block(dim: int, layer_id: int, depth: int, *, mlp_ratio: int, layer_scale_init: float, drop_path: float,
                     num_heads: int | None) -> nn.Module:
    return AttentionBlock(dim, num_heads, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=drop_path)


# Each builder takes (dim, layer_id, depth, *, mlp_ratio, layer_scale_init, drop_path, num_heads) and
# returns a block whose forward is (x [B, T, C], height, width) -> [B, T, C]; it may ignore the
# arguments its block has no use for.
def _vision_mamba_block(kind: str) -> Callable[..., nn.Module]:
    def build(dim: int, layer_id: int, depth: int, *, mlp_ratio: int, layer_scale_init: float, drop_path: float,
              num_heads: int | None) -> nn.Module:
        return VisionMambaBlock(dim, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, drop_path=drop_path,
                                **VISION_MAMBA_MIXERS[kind])

    return build


TOKEN_BLOCK_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "rwkv": _rwkv_block,  # Vision-RWKV, the paper's model
    "attention": _attention_block,  # global self-attention, the same-scale transformer baseline
    "mamba": _vision_mamba_block("mamba"),  # VMamba's SS2D: four-direction selective scan
    "mamba_bi": _vision_mamba_block("mamba_bi"),  # Vim-style bidirectional scan over the row-major sequence
}
TOKEN_MIXERS = tuple(TOKEN_BLOCK_BUILDERS)


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
        build_block = TOKEN_BLOCK_BUILDERS[token_mixer]
        self.blocks = nn.ModuleList(
            build_block(config.token_width, i, depth, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init,
                        drop_path=rates[i], num_heads=num_heads)
            for i in range(depth)
        )
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

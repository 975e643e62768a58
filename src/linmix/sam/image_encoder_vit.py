"""SAM's ViT image encoder (ViTDet style), the distillation teacher of RWKV-SAM.

Parameter names match the ``image_encoder.`` entries of an official SAM checkpoint::

    pos_embed                       [1, S, S, C]      (S = img_size // patch_size, 64 for SAM)
    patch_embed.proj.{weight,bias}  conv patch x patch, stride patch (3 -> C)
    blocks.{i}.norm1 / norm2        LayerNorm(C, eps 1e-6)
    blocks.{i}.attn.qkv             [3C, C] (rows: q, k, v; each head-major)
    blocks.{i}.attn.proj            [C, C]
    blocks.{i}.attn.rel_pos_h / _w  [2 * size - 1, C / heads]; size = window (14) or S (global blocks)
    blocks.{i}.mlp.lin1 / lin2      C -> 4C -> C (GELU)
    neck.0 conv1x1 (C -> 256, no bias), neck.1 LayerNorm2d, neck.2 conv3x3 (no bias), neck.3 LayerNorm2d

Block attention is windowed (``window_size`` x ``window_size``, the token grid zero-padded at the
bottom/right to a multiple of the window; padded tokens take part as keys, as in SAM) except at
``global_attn_indexes``. Attention logits get MViTv2's decomposed relative positions:
``logit[(i, j), (k, l)] = q . k_(k,l) / sqrt(d) + q . rel_pos_h[i - k + H - 1] + q . rel_pos_w[j - l + W - 1]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linmix.sam.common import LayerNorm2d, MLPBlock

__all__ = [
    "VIT_CONFIGS",
    "ImageEncoderViT",
    "ViTAttention",
    "ViTBlock",
    "build_vit",
    "relative_position_bias",
    "vit_b",
    "vit_h",
    "vit_l",
    "window_partition",
    "window_unpartition",
]

# Sizes of SAM's released encoders (all: patch 16, MLP ratio 4, window 14, 256-channel neck).
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """x [B, H, W, C] -> (windows [B * nH * nW, window, window, C], padded (Hp, Wp)); zero-pads bottom/right."""
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(batch, padded_h // window_size, window_size, padded_w // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: -> [B, H, W, C] with the padding cropped."""
    padded_h, padded_w = padded_hw
    height, width = hw
    rows, cols = padded_h // window_size, padded_w // window_size
    batch = windows.shape[0] // (rows * cols)
    x = windows.reshape(batch, rows, cols, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    return x[:, :height, :width, :]


def _relative_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """rel_pos [2 * size - 1, d] -> [size, size, d] with entry (i, k) = rel_pos[i - k + size - 1]."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative position table has {rel_pos.shape[0]} rows, expected 2 * {size} - 1 = {2 * size - 1}"
        )
    coords = torch.arange(size, device=rel_pos.device)
    index = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[index]


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative-position logits added to attention.

    q [B, heads, H * W, d] (unscaled queries, row-major tokens) -> bias [B, heads, H * W, H * W] with
    ``bias[(i, j), (k, l)] = q_(i, j) . rel_pos_h[i - k + H - 1] + q_(i, j) . rel_pos_w[j - l + W - 1]``.
    """
    height, width = size
    table_h = _relative_table(height, rel_pos_h).to(q.dtype)  # [H, H, d]
    table_w = _relative_table(width, rel_pos_w).to(q.dtype)  # [W, W, d]
    batch, heads, _, dim = q.shape
    grid_q = q.reshape(batch, heads, height, width, dim)
    rel_h = torch.einsum("bnhwd,hkd->bnhwk", grid_q, table_h)  # [B, heads, H, W, H]
    rel_w = torch.einsum("bnhwd,wkd->bnhwk", grid_q, table_w)  # [B, heads, H, W, W]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, heads, H, W, H, W]
    return bias.reshape(batch, heads, height * width, height * width)


class ViTAttention(nn.Module):
    """Multi-head self-attention on a token grid with decomposed relative positions.

    x [B, H, W, C] -> [B, H, W, C]; ``input_size`` (H, W) fixes the relative-position tables.
    """

    def __init__(self, dim: int, *, num_heads: int, input_size: tuple[int, int], qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.input_size = tuple(input_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # SAM zero-initialises the relative-position tables.
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.input_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        if (height, width) != self.input_size:
            raise ValueError(f"attention was built for a {self.input_size} grid, got {(height, width)}")
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, H*W, d]
        bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        # SDPA computes softmax(q k^T / sqrt(d) + bias) v, the same logits as SAM.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(out)


class ViTBlock(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size > 0``, else global.

    x [B, H, W, C] -> [B, H, W, C].
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int],
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attention_size = tuple(input_size) if window_size == 0 else (window_size, window_size)
        self.attn = ViTAttention(dim, num_heads=num_heads, input_size=attention_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, round(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    """Non-overlapping patch projection: image [B, 3, H, W] -> tokens [B, H/p, W/p, C]."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's image encoder: normalised, padded image [B, in_chans, img_size, img_size]
    -> embedding [B, out_chans, img_size / patch, img_size / patch] (256 x 64 x 64 for SAM).

    Args:
        img_size: side of the (square, padded) input; 1024 for SAM, small values for tests.
        patch_size: patch side (16).
        in_chans: input channels (3).
        embed_dim, depth, num_heads: transformer width, block count and heads.
        mlp_ratio: MLP hidden width / embed_dim (4).
        out_chans: neck output channels (256).
        qkv_bias: bias on the qkv projection (True in SAM).
        window_size: side of the attention windows (14); 0 makes every block global.
        global_attn_indexes: blocks with global attention.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        bad = [index for index in global_attn_indexes if not 0 <= index < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are outside the {depth} blocks")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.global_attn_indexes = tuple(global_attn_indexes)
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            ViTBlock(
                embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                window_size=0 if index in self.global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for index in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"image must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(normalised and padded), got {tuple(x.shape)}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def build_vit(name: str, **overrides: Any) -> ImageEncoderViT:
    """``build_vit("vit_h", img_size=...)``: one of :data:`VIT_CONFIGS`, any argument overridable."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown SAM ViT {name!r}; expected one of {sorted(VIT_CONFIGS)}")
    return ImageEncoderViT(**{**VIT_CONFIGS[name], **overrides})


def vit_b(**overrides: Any) -> ImageEncoderViT:
    """SAM ViT-B encoder (768 wide, 12 blocks, 12 heads; global attention at 2, 5, 8, 11)."""
    return build_vit("vit_b", **overrides)


def vit_l(**overrides: Any) -> ImageEncoderViT:
    """SAM ViT-L encoder (1024 wide, 24 blocks, 16 heads; global attention at 5, 11, 17, 23)."""
    return build_vit("vit_l", **overrides)


def vit_h(**overrides: Any) -> ImageEncoderViT:
    """SAM ViT-H encoder (1280 wide, 32 blocks, 16 heads; global attention at 7, 15, 23, 31)."""
    return build_vit("vit_h", **overrides)

"""SAM's prompt encoder: points, boxes and masks -> sparse and dense prompt embeddings.

Parameter names match the ``prompt_encoder.`` entries of an official SAM checkpoint::

    pe_layer.positional_encoding_gaussian_matrix   [2, embed_dim // 2]   (a buffer)
    point_embeddings.{0,1,2,3}.weight              [1, embed_dim]  (negative point, positive point,
                                                                    box top-left, box bottom-right)
    not_a_point_embed.weight, no_mask_embed.weight [1, embed_dim]
    mask_downscaling.{0,3,6}.{weight,bias}         conv 1->c/4 (2x2 s2), c/4->c (2x2 s2), c->embed_dim (1x1)
    mask_downscaling.{1,4}.{weight,bias}           LayerNorm2d (c = mask_in_chans)

Coordinates are pixels of the padded model input (``input_image_size``, 1024x1024 for SAM), (x, y)
order; a prompt point at pixel (x, y) is encoded at the pixel centre (x + 0.5, y + 0.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linmix.sam.common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]


def _is_tracing() -> bool:
    """True while exporting or compiling, where data-dependent checks cannot run."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D positions (Tancik et al.): [..., 2] in [0, 1] -> [..., 2 * num_pos_feats].

    ``pe(p) = [sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` with G [2, num_pos_feats] drawn once
    from N(0, scale^2) and stored as the buffer ``positional_encoding_gaussian_matrix``.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None):
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """unit_coords [..., 2] (x, y) in [0, 1] -> [..., 2 * num_pos_feats] in fp32."""
        gaussian = self.positional_encoding_gaussian_matrix.float()
        projected = (2.0 * unit_coords.float() - 1.0) @ gaussian
        projected = 2.0 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an h x w grid: -> [2 * num_pos_feats, h, w] (fp32)."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid = torch.stack(
            [xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1
        )  # [h, w, 2] as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords [B, N, 2] (x, y) in pixels of an image of ``image_size`` (H, W) -> [B, N, 2 * num_pos_feats]."""
        height, width = image_size
        scale = coords.new_tensor([width, height], dtype=torch.float32)
        return self._encode(coords.float() / scale)


class PromptEncoder(nn.Module):
    """Encode SAM prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding width (256 for SAM).
        image_embedding_size: (h, w) of the image embedding (64, 64 for SAM).
        input_image_size: (H, W) of the padded model input (1024, 1024 for SAM).
        mask_in_chans: hidden channels of the mask-input downscaler (16 for SAM).
        activation: activation of the mask downscaler.
    """

    num_point_embeddings = 4  # negative point, positive point, two box corners

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even (sin and cos halves), got {embed_dim}")
        if mask_in_chans % 4 != 0:
            raise ValueError(f"mask_in_chans must be a multiple of 4, got {mask_in_chans}")
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.point_embeddings = nn.ModuleList(
            [nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)]
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        # Mask inputs are at 4x the embedding resolution (256x256 for SAM); two stride-2 convs bring
        # them down to the embedding grid.
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def _weight(self) -> torch.Tensor:
        return self.not_a_point_embed.weight

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: -> [1, embed_dim, h, w] (parameter dtype)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self._weight.dtype)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """coords [B, N, 2] (x, y) pixels, labels [B, N] in {1, 0, -1} -> [B, N (+1 if pad), embed_dim]."""
        coords = coords + 0.5  # pixel centres
        labels = labels.to(coords.device)
        if pad:
            # Without a box SAM appends one "not a point" token; the decoder was trained that way.
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        encoding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        not_a_point = (labels == -1).unsqueeze(-1)
        negative = (labels == 0).unsqueeze(-1)
        positive = (labels == 1).unsqueeze(-1)
        dtype = self._weight.dtype
        embedding = torch.where(not_a_point, torch.zeros_like(encoding), encoding).to(dtype)
        embedding = embedding + not_a_point.to(dtype) * self.not_a_point_embed.weight
        embedding = embedding + negative.to(dtype) * self.point_embeddings[0].weight
        embedding = embedding + positive.to(dtype) * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes [B, 4] XYXY pixels -> [B, 2, embed_dim] (one token per corner)."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        encoding = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self._weight.dtype)
        corner_embeddings = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return encoding + corner_embeddings

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [B, 1, 4h, 4w] (logits) -> [B, embed_dim, h, w]."""
        return self.mask_downscaling(masks.to(self._weight.dtype))

    def _check_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        """Validate prompt shapes; returns the prompt batch size B."""
        batch_sizes: list[tuple[str, int]] = []
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ValueError("points must be a (coords [B, N, 2], labels [B, N]) pair")
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point coords must have shape [B, N, 2] (x, y), got {tuple(coords.shape)}")
            if labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"point labels must have shape [B, N] = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}"
                )
            if not _is_tracing() and labels.numel() > 0:
                bad = (labels != 1) & (labels != 0) & (labels != -1)
                if bool(bad.any()):
                    raise ValueError(
                        f"point labels must be 1 (foreground), 0 (background) or -1 (padding), "
                        f"got values {sorted(set(labels[bad].tolist()))}"
                    )
            batch_sizes.append(("points", coords.shape[0]))
        if boxes is not None:
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape [B, 4] (XYXY), got {tuple(boxes.shape)}")
            batch_sizes.append(("boxes", boxes.shape[0]))
        if masks is not None:
            expected = (1, *self.mask_input_size)
            if masks.dim() != 4 or tuple(masks.shape[1:]) != expected:
                raise ValueError(
                    f"masks must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(masks.shape)}"
                )
            batch_sizes.append(("masks", masks.shape[0]))
        if not batch_sizes:
            return 1
        if any(size != batch_sizes[0][1] for _, size in batch_sizes):
            shown = ", ".join(f"{name} {size}" for name, size in batch_sizes)
            raise ValueError(f"points, boxes and masks must share the prompt batch size B, got {shown}")
        return batch_sizes[0][1]

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of B prompts (any of the three may be None).

        Args:
            points: (coords [B, N, 2] (x, y) in input-frame pixels, labels [B, N] with 1 foreground,
                0 background, -1 padding). Without boxes one padding point is appended.
            boxes: [B, 4] XYXY in input-frame pixels; encoded as two corner tokens.
            masks: [B, 1, 4h, 4w] mask logits (Bx1x256x256 for SAM), e.g. a previous low-res output.

        Returns:
            sparse [B, N_tokens, embed_dim] (points, then box corners; N_tokens may be 0) and
            dense [B, embed_dim, h, w] (the downscaled masks, or ``no_mask_embed`` everywhere).
        """
        batch = self._check_prompts(points, boxes, masks)
        weight = self._weight
        sparse = weight.new_zeros(batch, 0, self.embed_dim)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            height, width = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        return sparse, dense

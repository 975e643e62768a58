"""SAM's two-way transformer mask decoder, plus RWKV-SAM's high-quality multiscale fusion.

Parameter names match the ``mask_decoder.`` entries of an official SAM checkpoint::

    transformer.layers.{0,1}.self_attn.{q,k,v,out}_proj                 256 -> 256 -> 256
    transformer.layers.{0,1}.cross_attn_{token_to_image,image_to_token}.{q,k,v,out}_proj
                                                                        256 -> 128 -> 256 (downsample 2)
    transformer.layers.{0,1}.norm{1,2,3,4}, .mlp.{lin1,lin2}            256 -> 2048 -> 256 (ReLU)
    transformer.final_attn_token_to_image.*, transformer.norm_final_attn
    iou_token.weight [1, 256]; mask_tokens.weight [4, 256] (0 = single mask, 1-3 = multimask)
    output_upscaling.{0,3} ConvTranspose 2x2 s2 (256 -> 64 -> 32); output_upscaling.1 LayerNorm2d(64)
    output_hypernetworks_mlps.{0..3}.layers.{0,1,2}   256 -> 256 -> 256 -> 32
    iou_prediction_head.layers.{0,1,2}                256 -> 256 -> 256 -> 4

The high-quality fusion modules (``hq_high_res``, ``hq_mid_res``, ``hq_mix``) are RWKV-SAM's and have
no SAM counterpart. With ``hq_fusion=False`` the decoder is exactly SAM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linmix.sam.common import LayerNorm2d, MLPBlock

__all__ = ["MLP", "MaskDecoder", "TwoWayAttention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class TwoWayAttention(nn.Module):
    """Multi-head attention whose q/k/v live in ``embedding_dim // downsample_rate`` dims.

    q [B, Nq, D], k [B, Nk, D], v [B, Nk, D] -> [B, Nq, D]; ``softmax(q k^T / sqrt(d_head)) v`` per head.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide embedding_dim // downsample_rate ({self.internal_dim})"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Nq, d_head]
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Sparse tokens and dense image tokens update each other (post-norm):

    1. token self-attention, 2. tokens -> image cross-attention, 3. MLP on the tokens,
    4. image -> tokens cross-attention. Positional encodings are re-added to q and k of every
    attention (the first layer's self-attention skips them, as in SAM).
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ):
        super().__init__()
        self.self_attn = TwoWayAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Nq, D], keys [B, Nk, D] (image tokens), *_pe the same shapes -> (queries, keys)."""
        if self.skip_first_layer_pe:
            # The first layer's tokens *are* the prompt embeddings, which already carry position.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: ``depth`` two-way blocks, then a final tokens -> image attention.

    Args:
        depth: number of two-way blocks (2 for SAM).
        embedding_dim: token width (256).
        num_heads: heads of every attention (8).
        mlp_dim: hidden width of the token MLP (2048).
        activation: MLP activation (ReLU in SAM).
        attention_downsample_rate: cross-attentions work in ``embedding_dim // rate`` dims (2).
    """

    def __init__(
        self,
        *,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ):
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(index == 0),
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding [B, D, h, w], image_pe [B, D, h, w], point_embedding [B, N, D]
        -> (tokens [B, N, D], image tokens [B, h*w, D] in row-major order)."""
        image_tokens = image_embedding.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries, keys = point_embedding, image_tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=image_pe)
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """``num_layers`` linears with ReLU between them (SAM's hypernetwork / IoU-head MLP; keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _expand_per_prompt(name: str, tensor: torch.Tensor, prompt_batch: int) -> torch.Tensor:
    """Per-image tensor [B_img, ...] -> per-prompt [B, ...], prompts grouped by image.

    SAM's convention: ``repeat_interleave`` over the image batch, so prompts [0, B/B_img) belong to
    image 0, the next B/B_img to image 1, and so on. B_img == 1 (SAM's predictor) broadcasts.
    """
    image_batch = tensor.shape[0]
    if image_batch == prompt_batch:
        return tensor
    if image_batch == 1:
        return tensor.expand(prompt_batch, *tensor.shape[1:])
    if prompt_batch % image_batch != 0:
        raise ValueError(
            f"{name} has batch {image_batch}, which must be 1 or divide the prompt batch {prompt_batch} "
            "(each image's prompts are consecutive)"
        )
    return torch.repeat_interleave(tensor, prompt_batch // image_batch, dim=0)


class MaskDecoder(nn.Module):
    """Predict masks and their IoU from image and prompt embeddings (SAM), optionally sharpened by
    RWKV-SAM's high-quality fusion of the backbone's stride-4 and stride-8 maps.

    Args:
        transformer_dim: width of tokens and image embedding (256).
        transformer: the two-way transformer; a default ``TwoWayTransformer`` when None.
        num_multimask_outputs: masks in multimask mode (3); one more token makes the single mask.
        activation: activation of the upscaling path.
        iou_head_depth, iou_head_hidden_dim: the IoU-prediction MLP (3 layers, 256 wide).
        hq_fusion: add the high-quality fusion (``hq_high_res``, ``hq_mid_res``, ``hq_mix``).
        stage1_channels: channels of the stride-4 backbone map (64 for RWKV-SAM small).
        stage2_channels: channels of the stride-8 backbone map (128 for RWKV-SAM small).

    High-quality fusion (with ``up`` = SAM's upscaled map, transformer_dim // 8 channels at 4h x 4w)::

        hr    = conv3x3(stage1 -> D/4) -> LN2d -> GELU -> conv3x3(D/4 -> D/8)        on stage 1 (4h x 4w)
        mr    = convT2x2s2(stage2 -> D/4) -> LN2d -> GELU -> conv3x3(D/4 -> D/8)    on stage 2 (2h x 2w)
        fused = mix(cat[up, mr, hr]) + up,  mix = conv3x3(3D/8 -> D/4) -> LN2d -> GELU -> conv3x3(D/4 -> D/8)

    and every mask token's hypernetwork output is dotted with ``fused`` instead of ``up``.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        hq_fusion: bool = True,
        stage1_channels: int = 64,
        stage2_channels: int = 128,
    ):
        super().__init__()
        if transformer_dim % 8 != 0:
            raise ValueError(f"transformer_dim must be a multiple of 8, got {transformer_dim}")
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        quarter, eighth = transformer_dim // 4, transformer_dim // 8
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, quarter, kernel_size=2, stride=2),
            LayerNorm2d(quarter),
            activation(),
            nn.ConvTranspose2d(quarter, eighth, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, eighth, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

        self.hq_fusion = hq_fusion
        self.stage1_channels = stage1_channels
        self.stage2_channels = stage2_channels
        if hq_fusion:
            self.hq_high_res = nn.Sequential(
                nn.Conv2d(stage1_channels, quarter, kernel_size=3, padding=1),
                LayerNorm2d(quarter),
                nn.GELU(),
                nn.Conv2d(quarter, eighth, kernel_size=3, padding=1),
            )
            self.hq_mid_res = nn.Sequential(
                nn.ConvTranspose2d(stage2_channels, quarter, kernel_size=2, stride=2),
                LayerNorm2d(quarter),
                nn.GELU(),
                nn.Conv2d(quarter, eighth, kernel_size=3, padding=1),
            )
            self.hq_mix = nn.Sequential(
                nn.Conv2d(3 * eighth, quarter, kernel_size=3, padding=1),
                LayerNorm2d(quarter),
                nn.GELU(),
                nn.Conv2d(quarter, eighth, kernel_size=3, padding=1),
            )

    def _check_inputs(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        width = self.transformer_dim
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != width:
            raise ValueError(
                f"image_embeddings must have shape [B_img, {width}, h, w], got {tuple(image_embeddings.shape)}"
            )
        grid = tuple(image_embeddings.shape[2:])
        if image_pe.dim() != 4 or image_pe.shape[1] != width or tuple(image_pe.shape[2:]) != grid:
            raise ValueError(
                f"image_pe must have shape [1, {width}, {grid[0]}, {grid[1]}], got {tuple(image_pe.shape)}"
            )
        if sparse_prompt_embeddings.dim() != 3 or sparse_prompt_embeddings.shape[2] != width:
            raise ValueError(
                f"sparse_prompt_embeddings must have shape [B, N, {width}], got {tuple(sparse_prompt_embeddings.shape)}"
            )
        if (
            dense_prompt_embeddings.dim() != 4
            or dense_prompt_embeddings.shape[1] != width
            or tuple(dense_prompt_embeddings.shape[2:]) != grid
        ):
            raise ValueError(
                f"dense_prompt_embeddings must have shape [B, {width}, {grid[0]}, {grid[1]}], "
                f"got {tuple(dense_prompt_embeddings.shape)}"
            )
        if dense_prompt_embeddings.shape[0] not in (1, sparse_prompt_embeddings.shape[0]):
            raise ValueError(
                f"dense_prompt_embeddings batch {dense_prompt_embeddings.shape[0]} must be 1 or equal the "
                f"sparse prompt batch {sparse_prompt_embeddings.shape[0]}"
            )
        if self.hq_fusion and hq_features is None:
            raise ValueError(
                "this decoder has the high-quality fusion (hq_fusion=True): pass hq_features=(stage1, stage2)"
            )
        if not self.hq_fusion and hq_features is not None:
            raise ValueError("hq_features were given but this decoder was built with hq_fusion=False")
        if hq_features is not None:
            if not isinstance(hq_features, (tuple, list)) or len(hq_features) != 2:
                raise ValueError("hq_features must be a (stage1 [B_img, C1, 4h, 4w], stage2 [B_img, C2, 2h, 2w]) pair")
            stage1, stage2 = hq_features
            image_batch, (height, width_) = image_embeddings.shape[0], grid
            expected1 = (image_batch, self.stage1_channels, 4 * height, 4 * width_)
            expected2 = (image_batch, self.stage2_channels, 2 * height, 2 * width_)
            if tuple(stage1.shape) != expected1:
                raise ValueError(f"hq stage-1 features must have shape {expected1}, got {tuple(stage1.shape)}")
            if tuple(stage2.shape) != expected2:
                raise ValueError(f"hq stage-2 features must have shape {expected2}, got {tuple(stage2.shape)}")

    def _hq_fuse(self, upscaled: torch.Tensor, mid_res: torch.Tensor, high_res: torch.Tensor, prompt_batch: int) -> torch.Tensor:
        """``hq_mix(cat[upscaled, mid_res, high_res]) + upscaled`` with ``mid_res, high_res`` per image.

        The first conv of ``hq_mix`` is linear in its input channels, so its image part (the
        ``mid_res, high_res`` channels, two thirds of the input) runs once per image and only the
        ``upscaled`` part once per prompt: the same sum, a third of the per-prompt work.
        """
        first = self.hq_mix[0]
        up_channels = upscaled.shape[1]
        image_part = F.conv2d(torch.cat([mid_res, high_res], dim=1), first.weight[:, up_channels:], first.bias,
                              padding=first.padding)
        prompt_part = F.conv2d(upscaled, first.weight[:, :up_channels], None, padding=first.padding)
        mixed = prompt_part + _expand_per_prompt("hq features", image_part, prompt_batch)
        return self.hq_mix[1:](mixed) + upscaled

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens at once: -> (masks [B, num_mask_tokens, 4h, 4w], iou_pred [B, num_mask_tokens]).

        Arguments as in :meth:`forward`.
        """
        self._check_inputs(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, hq_features)
        prompt_batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(prompt_batch, -1, -1).to(sparse_prompt_embeddings.dtype),
             sparse_prompt_embeddings],
            dim=1,
        )

        src = _expand_per_prompt("image_embeddings", image_embeddings, prompt_batch) + dense_prompt_embeddings
        pos_src = _expand_per_prompt("image_pe", image_pe, prompt_batch)
        batch, channels, height, width = src.shape

        hidden_tokens, image_tokens = self.transformer(src, pos_src, tokens)
        iou_token_out = hidden_tokens[:, 0, :]
        mask_tokens_out = hidden_tokens[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, channels, height, width))
        if hq_features is not None:
            stage1, stage2 = hq_features
            upscaled = self._hq_fuse(upscaled, self.hq_mid_res(stage2), self.hq_high_res(stage1), prompt_batch)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, index, :]) for index, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [B, num_mask_tokens, D/8]
        batch, channels, up_height, up_width = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, channels, up_height * up_width)).reshape(
            batch, -1, up_height, up_width
        )
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        hq_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against B_img images.

        Args:
            image_embeddings: [B_img, D, h, w] image-encoder output (D = 256, h = w = 64 for SAM).
                B_img is 1 (shared by all prompts) or divides B; prompts of one image are
                consecutive (SAM's ``repeat_interleave`` convention).
            image_pe: [1 or B_img, D, h, w] dense positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: [B, N, D] point / box tokens.
            dense_prompt_embeddings: [B (or 1), D, h, w] mask-input embedding.
            multimask_output: True -> the 3 ambiguity-aware masks (tokens 1-3); False -> token 0.
            hq_features: (stage1 [B_img, stage1_channels, 4h, 4w], stage2 [B_img, stage2_channels, 2h, 2w])
                when built with ``hq_fusion=True``; must be None otherwise.

        Returns:
            masks [B, 3 or 1, 4h, 4w] logits (256x256 for SAM) and iou_pred [B, 3 or 1].
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, hq_features
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

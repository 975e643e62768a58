"""The whole RWKV-SAM model (image encoder + prompt encoder + mask decoder), its registry and checkpoints.

Composition by injection, as Segment Anything's ``Sam``::

    model = RwkvSam(image_encoder=RwkvSamImageEncoder("small"), prompt_encoder=PromptEncoder(),
                    mask_decoder=MaskDecoder(stage1_channels=64, stage2_channels=128))

or, the usual way, ``build_rwkv_sam("small")`` / ``rwkv_sam_model_registry["small"](checkpoint=...)``.

Frames: the image encoder sees ``image_size x image_size`` inputs (1024, from the prompt encoder's
``input_image_size``): an RGB image whose longest side was resized to ``image_size``
(:class:`linmix.sam.transforms.ResizeLongestSide`), normalised with ``pixel_mean / pixel_std`` and
zero-padded at the bottom and right. Prompts are pixels of that resized frame; mask logits come out at
``4 x`` the embedding grid (256x256) and :meth:`RwkvSam.postprocess_masks` maps them back to the
original image.

Checkpoints: a linmix checkpoint is one safetensors file of the whole model's state dict
(:func:`save_rwkv_sam`), loaded strictly; an official SAM ``.pth`` can initialise the prompt encoder
and mask decoder (``sam_checkpoint=``), leaving the image encoder and the high-quality fusion at
their initialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from linmix.sam.backbone import BACKBONE_VARIANTS, PATCH_SIZE, RwkvSamImageEncoder
from linmix.sam.convert import load_sam_prompt_decoder
from linmix.sam.mask_decoder import MaskDecoder, TwoWayTransformer
from linmix.sam.prompt_encoder import PromptEncoder

__all__ = [
    "ImageFeatures",
    "RwkvSam",
    "build_rwkv_sam",
    "build_rwkv_sam_base",
    "build_rwkv_sam_large",
    "build_rwkv_sam_small",
    "build_rwkv_sam_tiny",
    "checkpoint_metadata",
    "load_default",
    "load_rwkv_sam_weights",
    "rwkv_sam_model_registry",
    "save_rwkv_sam",
]

IMAGE_SIZE = 1024
PROMPT_EMBED_DIM = 256


class ImageFeatures(NamedTuple):
    """What the mask decoder needs from a batch of B_img images.

    embedding ``[B_img, 256, h, w]`` (64x64 for a 1024 input) and hq_features
    ``(stage1 [B_img, C1, 4h, 4w], stage2 [B_img, C2, 2h, 2w])``, or None when the decoder has no
    high-quality fusion.
    """

    embedding: torch.Tensor
    hq_features: tuple[torch.Tensor, torch.Tensor] | None

    def select(self, index: int) -> ImageFeatures:
        """The features of image ``index``, keeping a batch dim of 1."""
        hq = None if self.hq_features is None else tuple(t[index : index + 1] for t in self.hq_features)
        return ImageFeatures(self.embedding[index : index + 1], hq)


class RwkvSam(nn.Module):
    """Promptable segmentation: image + points / boxes / mask -> masks and predicted IoUs.

    Args (keyword-only):
        image_encoder: ``x [B, 3, S, S]`` (normalised, padded) -> an object with ``embedding``
            ``[B, 256, S/16, S/16]``, ``stage1`` and ``stage2`` (:class:`RwkvSamImageEncoder`).
        prompt_encoder: :class:`PromptEncoder`; its ``input_image_size`` (S, S) fixes the model's
            input size ``image_size`` (1024).
        mask_decoder: :class:`MaskDecoder`; with ``hq_fusion`` it also receives stage1 / stage2.
        pixel_mean, pixel_std: per-channel RGB normalisation, in 0-255 units (SAM's ImageNet values).
        position_in_embedding: add the prompt encoder's dense positional encoding to the image
            embedding (a linmix addition, off for the paper's model). The conv + RWKV encoder has no
            position embedding and the decoder's attention alone cannot draw a mask at a prompted
            place: the mask is ``hypernetwork(token) . upscaled image features``, so it can only vary
            with position where the features do. SAM's ViT features carry position, and RWKV-SAM
            learns them by distilling SAM; a model trained from scratch without a SAM teacher needs
            this (without it, it learns one prompt-independent mask per image).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        position_in_embedding: bool = False,
    ):
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std must have 3 (RGB) values, got {pixel_mean!r}, {pixel_std!r}")
        if any(s <= 0 for s in pixel_std):
            raise ValueError(f"pixel_std must be positive, got {pixel_std!r}")
        height, width = prompt_encoder.input_image_size
        if height != width:
            raise ValueError(f"the prompt encoder's input_image_size must be square, got {(height, width)}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(height)
        self.position_in_embedding = bool(position_in_embedding)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ----------------------------------------------------------------------------------------------
    # frames

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and zero-pad bottom/right: ``[3, H, W]`` or ``[B, 3, H, W]`` RGB 0-255 (H, W <= image_size)
        -> ``[(B,) 3, image_size, image_size]`` in the model's floating dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"preprocess expects an RGB image [3, H, W] or batch [B, 3, H, W], got {getattr(x, 'shape', type(x))}"
            )
        height, width = x.shape[-2:]
        if height > self.image_size or width > self.image_size or height == 0 or width == 0:
            raise ValueError(
                f"image sides must be in [1, {self.image_size}] (resize the longest side to {self.image_size} "
                f"with ResizeLongestSide first), got (H, W) = ({height}, {width})"
            )
        x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - width, 0, self.image_size - height))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Mask logits ``[B, C, 4h, 4w]`` -> ``[B, C, H, W]`` logits at ``original_size`` (H, W).

        Bilinear upsampling to ``image_size x image_size``, crop of the padding down to ``input_size``
        (the resized image's (H', W') before padding), then bilinear resize to ``original_size``.
        """
        if masks.dim() != 4:
            raise ValueError(f"masks must have shape [B, C, h, w], got {tuple(masks.shape)}")
        input_h, input_w = (int(s) for s in input_size)
        original_h, original_w = (int(s) for s in original_size)
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., :input_h, :input_w]
        return F.interpolate(masks, (original_h, original_w), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------------
    # encode and decode

    def get_image_features(self, images: torch.Tensor) -> ImageFeatures:
        """Preprocessed images ``[B_img, 3, image_size, image_size]`` (from :meth:`preprocess`) -> :class:`ImageFeatures`."""
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be preprocessed to [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(see RwkvSam.preprocess), got {tuple(images.shape)}"
            )
        output = self.image_encoder(images)
        hq = (output.stage1, output.stage2) if getattr(self.mask_decoder, "hq_fusion", False) else None
        embedding = output.embedding
        if self.position_in_embedding:
            embedding = embedding + self.prompt_encoder.get_dense_pe().to(embedding.dtype)
        return ImageFeatures(embedding, hq)

    def decode(
        self,
        features: ImageFeatures,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against the features of 1 (or B_img dividing B) images.

        Args:
            features: from :meth:`get_image_features`.
            point_coords: ``[B, N, 2]`` (x, y) pixels of the resized input frame; point_labels ``[B, N]``
                (1 foreground, 0 background, -1 padding).
            boxes: ``[B, 4]`` XYXY in the input frame.
            mask_inputs: ``[B, 1, 256, 256]`` mask logits (e.g. an earlier ``low_res_logits``).
            multimask_output: 3 masks per prompt when True, 1 otherwise.

        Returns:
            low_res_logits ``[B, C, 256, 256]`` and iou_predictions ``[B, C]``, C = 3 or 1.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        kwargs: dict[str, Any] = {}
        if features.hq_features is not None:
            kwargs["hq_features"] = features.hq_features
        return self.mask_decoder(
            image_embeddings=features.embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **kwargs,
        )

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """SAM's end-to-end call on a list of images, each with its own prompts.

        Each record: ``image`` ``[3, H, W]`` RGB 0-255 already resized (longest side image_size);
        ``original_size`` (H, W) before resizing; optional ``point_coords`` ``[B, N, 2]`` with
        ``point_labels`` ``[B, N]``, ``boxes`` ``[B, 4]``, ``mask_inputs`` ``[B, 1, 256, 256]``, all in
        the resized frame.

        Returns one dict per image: ``masks`` ``[B, C, H, W]`` bool at the original size,
        ``iou_predictions`` ``[B, C]``, ``low_res_logits`` ``[B, C, 256, 256]`` (C = 3 or 1).
        Gradients flow (for fine-tuning); wrap in ``torch.no_grad()`` for inference.
        """
        if not isinstance(batched_input, (list, tuple)) or not batched_input:
            raise ValueError("batched_input must be a non-empty list of dicts (one per image)")
        for index, record in enumerate(batched_input):
            missing = [key for key in ("image", "original_size") if key not in record]
            if missing:
                raise ValueError(f"batched_input[{index}] lacks {missing}")
            if ("point_coords" in record) != ("point_labels" in record):
                raise ValueError(f"batched_input[{index}]: point_coords and point_labels must be given together")
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input], dim=0)
        features = self.get_image_features(images)
        outputs = []
        for index, record in enumerate(batched_input):
            low_res, iou = self.decode(
                features.select(index),
                point_coords=record.get("point_coords"),
                point_labels=record.get("point_labels"),
                boxes=record.get("boxes"),
                mask_inputs=record.get("mask_inputs"),
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_rwkv_sam(
    model: RwkvSam, path: str | PathLike[str], *, dtype: torch.dtype | None = None, extra_metadata: dict[str, str] | None = None
) -> None:
    """Write the whole model's state dict to one safetensors file (loadable with ``checkpoint=``).

    The file's metadata records ``variant``, ``token_mixer``, ``image_size`` and ``position_in_embedding`` (when the model was
    built by :func:`build_rwkv_sam`) so ``build_rwkv_sam(variant, checkpoint=path)`` rebuilds the same
    model. ``dtype`` (e.g. ``torch.float16``) casts floating tensors to halve the file; loading casts
    them back to the model's dtype.
    """
    from safetensors.torch import save_file

    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    metadata = {"format": "pt", "model": "linmix.RwkvSam", "image_size": str(model.image_size),
                "position_in_embedding": str(bool(getattr(model, "position_in_embedding", False))).lower()}
    if getattr(model, "variant", None) is not None:
        metadata["variant"] = str(model.variant)
    token_mixer = getattr(getattr(model.image_encoder, "backbone", None), "token_mixer", None)
    if token_mixer is not None:
        metadata["token_mixer"] = str(token_mixer)
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    save_file(state, str(path), metadata=metadata)


def checkpoint_metadata(path: str | PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (variant, token_mixer, image_size, ... when
    written by :func:`save_rwkv_sam`); FileNotFoundError / ValueError for a missing or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RWKV-SAM checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise ValueError(f"{path} is not a safetensors file ({error})") from error


def load_rwkv_sam_weights(model: nn.Module, path: str | PathLike[str]) -> None:
    """Strictly load a safetensors file written by :func:`save_rwkv_sam` into ``model``.

    Raises FileNotFoundError for a missing file, ValueError naming every missing, unexpected or
    mis-shaped key (nothing is copied then).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RWKV-SAM checkpoint not found: {path}")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise ValueError(f"{path} is not a safetensors file ({error})") from error
    targets = model.state_dict()
    problems = [f"missing key '{k}' (model expects shape {tuple(v.shape)})" for k, v in targets.items() if k not in state]
    problems += [f"unexpected key '{k}' (checkpoint shape {tuple(v.shape)})" for k, v in state.items() if k not in targets]
    problems += [
        f"key '{k}': checkpoint shape {tuple(state[k].shape)} != model shape {tuple(v.shape)}"
        for k, v in targets.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"cannot load {path} into {type(model).__name__} (wrong variant?):\n  {shown}")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# registry


def build_rwkv_sam(
    variant: str = "small",
    checkpoint: str | PathLike[str] | None = None,
    *,
    token_mixer: str | None = None,
    sam_checkpoint: str | PathLike[str] | None = None,
    image_size: int | None = None,
    position_in_embedding: bool | None = None,
) -> RwkvSam:
    """An RWKV-SAM model, in evaluation mode.

    Args:
        variant: backbone size, one of tiny, small (the paper's), base, large.
        checkpoint: a linmix safetensors file of the whole model (:func:`save_rwkv_sam`), loaded strictly.
        token_mixer: "rwkv" (the paper's), "attention" (the same-scale transformer baseline), "mamba"
            (VMamba's SS2D) or "mamba_bi" (a Vim-style bidirectional scan), see
            :data:`linmix.sam.backbone.TOKEN_MIXERS`; default: the checkpoint's (from its metadata), else "rwkv".
        sam_checkpoint: an official SAM ``.pth`` (e.g. ``sam_vit_h_4b8939.pth``) whose prompt encoder and
            mask decoder initialise ours; the image encoder and the high-quality fusion keep their init.
            Not together with ``checkpoint`` (which already holds every weight).
        image_size: side of the square model input, a multiple of 16 (1024 as SAM; smaller sizes such as
            256 make a model for CPU training); the embedding grid is image_size / 16 and the mask
            logits 4x that. Default: the checkpoint's (from its metadata), else 1024.
        position_in_embedding: see :class:`RwkvSam` (for models trained from scratch without a SAM
            teacher). Default: the checkpoint's (from its metadata), else False.
    """
    if variant not in BACKBONE_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(BACKBONE_VARIANTS)}, got {variant!r}")
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("pass either checkpoint= (a whole linmix model) or sam_checkpoint= (SAM's decoder), not both")
    metadata = checkpoint_metadata(checkpoint) if checkpoint is not None else {}
    if "variant" in metadata and metadata["variant"] != variant:
        raise ValueError(f"{checkpoint} holds an RWKV-SAM {metadata['variant']!r} model, not {variant!r}")
    if token_mixer is None:
        token_mixer = metadata.get("token_mixer", "rwkv")
    elif "token_mixer" in metadata and metadata["token_mixer"] != token_mixer:
        raise ValueError(f"{checkpoint} holds a token_mixer={metadata['token_mixer']!r} model, not {token_mixer!r}")
    if image_size is None:
        image_size = int(metadata.get("image_size", IMAGE_SIZE))
    stored_position = metadata.get("position_in_embedding")
    if stored_position not in (None, "true", "false"):
        raise ValueError(f"{checkpoint} has position_in_embedding metadata {stored_position!r}; expected 'true' or 'false'")
    if position_in_embedding is None:
        position_in_embedding = stored_position == "true"
    elif stored_position is not None and (stored_position == "true") != bool(position_in_embedding):
        raise ValueError(f"{checkpoint} was trained with position_in_embedding={stored_position}, not {bool(position_in_embedding)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size!r}")
    grid = image_size // PATCH_SIZE
    image_encoder = RwkvSamImageEncoder(variant, token_mixer, out_dim=PROMPT_EMBED_DIM)
    stage1_channels, stage2_channels, _ = image_encoder.backbone.stage_channels
    model = RwkvSam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8, mlp_dim=2048),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            hq_fusion=True,
            stage1_channels=stage1_channels,
            stage2_channels=stage2_channels,
        ),
        position_in_embedding=bool(position_in_embedding),
    )
    model.variant = variant
    if sam_checkpoint is not None:
        model.sam_load_report = load_sam_prompt_decoder(model.prompt_encoder, model.mask_decoder, sam_checkpoint)
    if checkpoint is not None:
        load_rwkv_sam_weights(model, checkpoint)
    return model.eval()


DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = "rwkv_sam_tiny_procedural.safetensors"


def default_checkpoint_path(token_mixer: str = "rwkv") -> Path:
    """Where the shipped checkpoint lives (package data under ``linmix/sam/weights/``)."""
    if token_mixer not in ("rwkv", "attention"):
        raise ValueError(f"token_mixer must be 'rwkv' or 'attention', got {token_mixer!r}")
    name = DEFAULT_CHECKPOINT if token_mixer == "rwkv" else DEFAULT_CHECKPOINT.replace("rwkv_sam_", "attention_sam_")
    return DEFAULT_WEIGHTS_DIR / name


def load_default(token_mixer: str = "rwkv", *, image_size: int | None = None) -> RwkvSam:
    """The shipped RWKV-SAM model, in evaluation mode: a tiny variant at a reduced input size trained
    on linmix's procedural high-quality data only (see docs/sam.md; not a model of natural images).

    ``token_mixer="attention"`` loads the same-scale attention baseline trained with the identical recipe,
    when it is shipped. ``image_size`` runs it at another input side than the one it was trained at
    (a multiple of 16). Raises FileNotFoundError when the weights file is absent.

    The model's ``automatic_mask_defaults`` holds the automatic-mask thresholds stored beside the
    weights (:mod:`linmix.sam.auto_defaults`; SAM's when there is no such file).
    """
    path = default_checkpoint_path(token_mixer)
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped RWKV-SAM weights are missing: expected {path} (train one with `linmix sam train`, "
            "or pass your own file to build_rwkv_sam(variant, checkpoint=...))"
        )
    metadata = checkpoint_metadata(path)
    if "variant" not in metadata:
        raise ValueError(f"{path} lacks the 'variant' metadata written by save_rwkv_sam")
    from linmix.sam.auto_defaults import read_automatic_mask_defaults

    model = build_rwkv_sam(metadata["variant"], checkpoint=path, image_size=image_size)
    model.automatic_mask_defaults = read_automatic_mask_defaults(path)
    return model


def build_rwkv_sam_tiny(checkpoint=None, *, token_mixer: str | None = None, sam_checkpoint=None, image_size: int | None = None) -> RwkvSam:
    """RWKV-SAM tiny (token width 192); arguments as :func:`build_rwkv_sam`."""
    return build_rwkv_sam("tiny", checkpoint, token_mixer=token_mixer, sam_checkpoint=sam_checkpoint, image_size=image_size)


def build_rwkv_sam_small(checkpoint=None, *, token_mixer: str | None = None, sam_checkpoint=None, image_size: int | None = None) -> RwkvSam:
    """RWKV-SAM small (token width 384, the paper's model); arguments as :func:`build_rwkv_sam`."""
    return build_rwkv_sam("small", checkpoint, token_mixer=token_mixer, sam_checkpoint=sam_checkpoint, image_size=image_size)


def build_rwkv_sam_base(checkpoint=None, *, token_mixer: str | None = None, sam_checkpoint=None, image_size: int | None = None) -> RwkvSam:
    """RWKV-SAM base (token width 768); arguments as :func:`build_rwkv_sam`."""
    return build_rwkv_sam("base", checkpoint, token_mixer=token_mixer, sam_checkpoint=sam_checkpoint, image_size=image_size)


def build_rwkv_sam_large(checkpoint=None, *, token_mixer: str | None = None, sam_checkpoint=None, image_size: int | None = None) -> RwkvSam:
    """RWKV-SAM large (token width 1024); arguments as :func:`build_rwkv_sam`."""
    return build_rwkv_sam("large", checkpoint, token_mixer=token_mixer, sam_checkpoint=sam_checkpoint, image_size=image_size)


rwkv_sam_model_registry: dict[str, Callable[..., RwkvSam]] = {
    "default": build_rwkv_sam_small,
    "tiny": build_rwkv_sam_tiny,
    "small": build_rwkv_sam_small,
    "base": build_rwkv_sam_base,
    "large": build_rwkv_sam_large,
}

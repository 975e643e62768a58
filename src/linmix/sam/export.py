"""ONNX export of RWKV-SAM: the image encoder (with its Vision-RWKV blocks) and a SAM-style decoder.

Two graphs, as in Segment Anything's ONNX deployment (run the encoder once per image, the light
decoder once per click):

- :func:`export_image_encoder_onnx`: ``image [1, 3, S, S]`` (normalised and zero-padded, i.e. what
  :meth:`RwkvSam.preprocess` returns) -> ``image_embeddings [1, 256, S/16, S/16]``,
  ``stage1 [1, C1, S/4, S/4]``, ``stage2 [1, C2, S/8, S/8]`` (the high-quality features the decoder
  graph takes). The image size is fixed at export time (any positive multiple of 16; the decoder's
  grid must match it).
- :func:`export_decoder_onnx`: prompt encoder + mask decoder with a dynamic number of points, the
  inputs of SAM's ``SamOnnxModel``::

      image_embeddings [1, 256, h, w]   stage1 [1, C1, 4h, 4w]   stage2 [1, C2, 2h, 2w]
      point_coords     [1, N, 2] float  (x, y) pixels of the model's input frame (image_size,
                                        e.g. 1024), N dynamic (>= 1)
      point_labels     [1, N] float     1 foreground, 0 background, 2 box top-left, 3 box
                                        bottom-right, -1 padding ("not a point")
      mask_input       [1, 1, 4h, 4w]   previous low-res mask logits (zeros when unused)
      has_mask_input   [1] float        1 to use mask_input, 0 to ignore it

  and outputs ``masks [1, C, 4h, 4w]`` -- the LOW-RESOLUTION mask logits (256x256 for a 1024 model,
  the same as :meth:`RwkvSam.decode`'s ``low_res_logits``; upscale them with
  :meth:`RwkvSam.postprocess_masks`) -- and ``iou_predictions [1, C]``, C = 3 with
  ``multimask_output`` else 1.

  As with SAM's ONNX model, the caller encodes prompts: a box becomes two points labelled 2 and 3
  (its XYXY corners), and when there is no box one padding point ``(0, 0)`` with label -1 must be
  appended (the PyTorch prompt encoder appends it itself; the decoder was trained with it).

Both use the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``); check
the files with ``onnxruntime``.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from torch import nn

__all__ = ["ImageEncoderOnnxModel", "SamDecoderOnnxModel", "export_decoder_onnx", "export_image_encoder_onnx"]

ENCODER_INPUT_NAMES = ("image",)
ENCODER_OUTPUT_NAMES = ("image_embeddings", "stage1", "stage2")
DECODER_INPUT_NAMES = ("image_embeddings", "stage1", "stage2", "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUT_NAMES = ("masks", "iou_predictions")


def _image_encoder_of(model: nn.Module) -> nn.Module:
    """An :class:`RwkvSam` -> its image encoder; an image encoder is returned as is."""
    return model.image_encoder if hasattr(model, "image_encoder") else model


class ImageEncoderOnnxModel(nn.Module):
    """``image [B, 3, S, S]`` -> ``(image_embeddings, stage1, stage2)`` as a plain tuple (for export).

    ``position``: ``[1, 256, S/16, S/16]`` added to the embedding, for a model built with
    ``position_in_embedding`` (so the ONNX embedding equals :meth:`RwkvSam.get_image_features`'s)."""

    def __init__(self, image_encoder: nn.Module, position: torch.Tensor | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        self.register_buffer("position", position, persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.image_encoder(image)
        embedding = output.embedding if self.position is None else output.embedding + self.position.to(output.embedding.dtype)
        return embedding, output.stage1, output.stage2


class SamDecoderOnnxModel(nn.Module):
    """Prompt encoder + mask decoder with SAM's ONNX interface (see the module docstring).

    Points are embedded with label masks instead of Python branches, so one graph serves every N:
    ``pe(coords + 0.5)`` zeroed where the label is -1, plus ``not_a_point_embed`` there and
    ``point_embeddings[i]`` where the label is ``i`` (0 negative, 1 positive, 2 / 3 box corners).
    The dense prompt is ``has_mask_input * mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask_embed``.
    """

    def __init__(self, model: nn.Module, *, multimask_output: bool = True):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.multimask_output = bool(multimask_output)
        self.hq_fusion = bool(getattr(self.mask_decoder, "hq_fusion", False))

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        encoder = self.prompt_encoder
        coords = point_coords.float() + 0.5  # pixel centres, as PromptEncoder
        encoding = encoder.pe_layer.forward_with_coords(coords, encoder.input_image_size)  # [B, N, D]
        labels = point_labels.unsqueeze(-1).float()  # [B, N, 1]
        not_a_point = (labels == -1).to(encoding.dtype)
        embedding = encoding * (1.0 - not_a_point) + not_a_point * encoder.not_a_point_embed.weight
        for index, point_embedding in enumerate(encoder.point_embeddings):
            embedding = embedding + (labels == index).to(encoding.dtype) * point_embedding.weight
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.prompt_encoder
        downscaled = encoder.mask_downscaling(mask_input)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        return has_mask * downscaled + (1.0 - has_mask) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        stage1: torch.Tensor,
        stage2: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        hq_features = (stage1, stage2) if self.hq_fusion else None
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
            hq_features=hq_features,
        )


def _export(module: nn.Module, args: tuple, path, *, input_names, output_names, dynamic_shapes, opset, optimize) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            optimize=bool(optimize),
            **kwargs,
        )
    # One self-contained file (weights inline) while the model is under protobuf's 2 GB limit.
    program.save(str(path), external_data=False)
    return path


def export_image_encoder_onnx(
    model: nn.Module,
    path: str | PathLike[str],
    *,
    image_size: int = 1024,
    opset: int | None = None,
    optimize: bool = True,
) -> Path:
    """Export the image encoder (conv stages, Vision-RWKV blocks, neck) to ONNX at ``path``.

    Args:
        model: an :class:`RwkvSam` (its ``image_encoder`` is exported) or an image encoder itself.
        image_size: the fixed input side S, a positive multiple of 16 (the model's own input size,
            1024 for the registry's models; smaller sizes export too, for the backbone is size-agnostic).
        opset: ONNX opset, or None for the exporter's default.
        optimize: run onnxscript's graph optimizer (constant folding, fusions). It dominates export
            time for the encoder (about 75 of 145 s for the tiny variant at S = 256 on 2 CPU cores);
            ``optimize=False`` gives a larger but equivalent graph (onnxruntime optimises it on load).

    Graph: ``image [1, 3, S, S]`` float32 (preprocessed) -> ``image_embeddings [1, 256, S/16, S/16]``,
    ``stage1 [1, C1, S/4, S/4]``, ``stage2 [1, C2, S/8, S/8]``. Returns the path written.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size!r}")
    position = None
    if getattr(model, "position_in_embedding", False):
        grid = image_size // 16
        with torch.no_grad():
            position = model.prompt_encoder.pe_layer((grid, grid)).unsqueeze(0)
    encoder = ImageEncoderOnnxModel(_image_encoder_of(model), position).eval()
    parameter = next(encoder.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=torch.float32, device=parameter.device)
    return _export(
        encoder, (image,), path,
        input_names=ENCODER_INPUT_NAMES, output_names=ENCODER_OUTPUT_NAMES, dynamic_shapes=None, opset=opset,
        optimize=optimize,
    )


def export_decoder_onnx(
    model: nn.Module,
    path: str | PathLike[str],
    *,
    multimask_output: bool = True,
    opset: int | None = None,
    optimize: bool = True,
) -> Path:
    """Export the prompt encoder + mask decoder of an :class:`RwkvSam` to ONNX at ``path``.

    Inputs and outputs are those of the module docstring; the number of points N is dynamic. The
    embedding grid (h, w) is the prompt encoder's ``image_embedding_size`` and coordinates are in its
    ``input_image_size`` frame. ``masks`` are low-resolution logits ``[1, C, 4h, 4w]`` (C = 3 with
    ``multimask_output``, else 1). ``opset`` and ``optimize`` as in :func:`export_image_encoder_onnx`.
    Without the high-quality fusion ``stage1`` / ``stage2`` are unused (the exporter may drop them). Returns the path written.
    """
    wrapper = SamDecoderOnnxModel(model, multimask_output=multimask_output).eval()
    prompt_encoder = model.prompt_encoder
    decoder = model.mask_decoder
    parameter = next(wrapper.parameters())
    device = parameter.device
    height, width = prompt_encoder.image_embedding_size
    dim = prompt_encoder.embed_dim
    stage1_channels = getattr(decoder, "stage1_channels", 1)
    stage2_channels = getattr(decoder, "stage2_channels", 1)
    points = 5  # an example N > 1, so the exporter keeps N symbolic
    generator = torch.Generator().manual_seed(0)
    size = float(prompt_encoder.input_image_size[0])
    args = (
        torch.randn(1, dim, height, width, generator=generator).to(device),
        torch.randn(1, stage1_channels, 4 * height, 4 * width, generator=generator).to(device),
        torch.randn(1, stage2_channels, 2 * height, 2 * width, generator=generator).to(device),
        (torch.rand(1, points, 2, generator=generator) * size).to(device),
        torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]], device=device),
        torch.zeros(1, 1, 4 * height, 4 * width, device=device),
        torch.zeros(1, device=device),
    )
    num_points = torch.export.Dim("num_points", min=1, max=4096)
    dynamic_shapes = (None, None, None, {1: num_points}, {1: num_points}, None, None)
    return _export(
        wrapper, args, path,
        input_names=DECODER_INPUT_NAMES, output_names=DECODER_OUTPUT_NAMES, dynamic_shapes=dynamic_shapes, opset=opset,
        optimize=optimize,
    )

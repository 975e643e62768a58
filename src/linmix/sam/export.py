"""ONNX export of RWKV-SAM: the image encoder (with its Vision-RWKV blocks) and a SAM-style decoder.

Two graphs, as in Segment Anything's ONNX deployment (run the encoder once per image, the light
decoder once per click):

- :func:`export_image_encoder_onnx`: ``image [1, 3, S, S]`` (normalised and zero-padded, i.e. what
  :meth:`RwkvSam.preprocess` returns) -> ``image_embeddings [1, 256, S/16, S/16]``,
  ``stage1_features [1, C1, S/4, S/4]``, ``stage2_features [1, C2, S/8, S/8]`` (the encoder's
  stage-1 and stage-2 maps, which the high-quality decoder also reads). The image size is fixed at
  export time (any positive multiple of 16; the decoder's grid must match it).
- :func:`export_decoder_onnx`: prompt encoder + mask decoder + mask postprocessing with the interface
  of Segment Anything's ONNX decoder (``segment_anything.utils.onnx.SamOnnxModel``), so a client
  written for SAM's exported model (e.g. its ``onnx_model_example`` notebook) runs it unchanged but
  for the two extra feature maps. Inputs (all float32; S is the model's ``image_size``, 1024 for the
  registry's models, h = w = S/16)::

      image_embeddings [1, 256, h, w]   RwkvSamPredictor.get_image_embedding()
      point_coords     [1, N, 2]        (x, y) pixels of the resized-longest-side frame (the client
                                        applies predictor.transform.apply_coords); N dynamic (>= 1)
      point_labels     [1, N]           1 foreground, 0 background, 2 box top-left, 3 box
                                        bottom-right, -1 padding ("not a point")
      mask_input       [1, 1, 4h, 4w]   previous low-res mask logits (zeros when unused)
      has_mask_input   [1]              1 to use mask_input, 0 to ignore it
      orig_im_size     [2]              (H, W) of the image before resizing; dynamic in the graph
      stage1_features  [1, C1, 4h, 4w]  only for a decoder with the high-quality fusion
      stage2_features  [1, C2, 2h, 2w]  (RwkvSamPredictor.get_image_features().hq_features)

  Outputs, as SAM's::

      masks            [1, C, H, W]     mask LOGITS at the original size (threshold them at
                                        model.mask_threshold = 0): bilinear upscaling to S x S, the
                                        padding cropped to the resized size, bilinear resize to (H, W)
      iou_predictions  [1, C]           predicted IoU (or the stability score, see below)
      low_res_masks    [1, C, 4h, 4w]   the logits before upscaling (feed one back as mask_input)

  C = 4 (all mask tokens: index 0 is what ``RwkvSamPredictor.predict(multimask_output=False)``
  returns, 1-3 its multimask outputs) or, with ``return_single_mask``, 1 chosen by SAM's rule: token
  0 when N > 2 (N counts the padding point and box corners: several clicks, or a box and a click),
  otherwise the multimask output with the highest score (one click, or a box alone).
  ``use_stability_score`` replaces the predicted IoUs with the stability score of the low-res logits
  (offset 1.0); ``return_extra_metrics`` returns ``masks, iou_predictions, stability_scores [1, C],
  areas [1, C] (int64 pixel counts of masks > 0), low_res_masks`` (SAM's script names only the first
  three outputs, whatever they hold; here each of the five has its name).

  As with SAM's ONNX model, the caller encodes prompts: a box becomes two points labelled 2 and 3
  (its XYXY corners), and when there is no box one padding point ``(0, 0)`` with label -1 must be
  appended (the PyTorch prompt encoder appends it itself; the decoder was trained with it).

Both use the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``); check
the files with ``onnxruntime``.
"""

from __future__ import annotations

import copy
import warnings
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from linmix.sam.automatic_mask_generator import calculate_stability_score

__all__ = [
    "ImageEncoderOnnxModel",
    "SamDecoderOnnxModel",
    "decoder_input_names",
    "decoder_output_names",
    "export_decoder_onnx",
    "export_image_encoder_onnx",
]

HQ_FEATURE_NAMES = ("stage1_features", "stage2_features")
ENCODER_INPUT_NAMES = ("image",)
ENCODER_OUTPUT_NAMES = ("image_embeddings", *HQ_FEATURE_NAMES)
SAM_DECODER_INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
SAM_DECODER_OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
EXTRA_METRICS_OUTPUT_NAMES = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
STABILITY_SCORE_OFFSET = 1.0  # SAM's ONNX model's offset around the mask threshold


def decoder_input_names(hq_fusion: bool) -> tuple[str, ...]:
    """The decoder graph's inputs: SAM's six, then the two feature maps of a high-quality decoder."""
    return SAM_DECODER_INPUT_NAMES + (HQ_FEATURE_NAMES if hq_fusion else ())


def decoder_output_names(return_extra_metrics: bool = False) -> tuple[str, ...]:
    """The decoder graph's outputs, in order (SAM's three, or five with the extra metrics)."""
    return EXTRA_METRICS_OUTPUT_NAMES if return_extra_metrics else SAM_DECODER_OUTPUT_NAMES


def _image_encoder_of(model: nn.Module) -> nn.Module:
    """An :class:`RwkvSam` -> its image encoder; an image encoder is returned as is."""
    return model.image_encoder if hasattr(model, "image_encoder") else model


class ImageEncoderOnnxModel(nn.Module):
    """``image [B, 3, S, S]`` -> ``(image_embeddings, stage1_features, stage2_features)`` as a plain tuple (for export).

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
    """Prompt encoder + mask decoder + mask postprocessing with SAM's ONNX interface (module docstring).

    Also runs in PyTorch (the computation the graph holds). Points are embedded
    with label masks instead of Python branches, so one graph serves every N: ``pe(coords + 0.5)``
    zeroed where the label is -1, plus ``not_a_point_embed`` there and ``point_embeddings[i]`` where
    the label is ``i`` (0 negative, 1 positive, 2 / 3 box corners). The dense prompt is
    ``has_mask_input * mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask_embed``.

    Args:
        model: an :class:`RwkvSam` (its ``prompt_encoder``, ``mask_decoder``, ``image_size`` and
            ``mask_threshold`` are used; the modules are shared, not copied).
        return_single_mask: return one mask per prompt, chosen by SAM's rule (module docstring),
            instead of all ``num_mask_tokens`` (4).
        use_stability_score: report the stability score of the low-res logits as ``iou_predictions``.
        return_extra_metrics: also return stability scores and areas of the upscaled masks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ):
        super().__init__()
        for name, value in (("return_single_mask", return_single_mask), ("use_stability_score", use_stability_score),
                            ("return_extra_metrics", return_extra_metrics)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for attribute in ("prompt_encoder", "mask_decoder", "image_size"):
            if not hasattr(model, attribute):
                raise ValueError(f"SamDecoderOnnxModel needs an RwkvSam model (with {attribute}), got {type(model).__name__}")
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.image_size = int(model.image_size)
        self.mask_threshold = float(getattr(model, "mask_threshold", 0.0))
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_score_offset = STABILITY_SCORE_OFFSET
        self.hq_fusion = bool(getattr(self.mask_decoder, "hq_fusion", False))

    @property
    def input_names(self) -> tuple[str, ...]:
        return decoder_input_names(self.hq_fusion)

    @property
    def output_names(self) -> tuple[str, ...]:
        return decoder_output_names(self.return_extra_metrics)

    @staticmethod
    def resized_image_size(orig_im_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """``(H, W)`` float -> the int64 ``(H', W')`` that :class:`ResizeLongestSide` resizes it to
        (each side scaled by ``longest_side / max(H, W)``, rounded half up; computed in float32 as SAM's graph)."""
        size = orig_im_size.to(torch.float32)
        # maximum of the two sides, not torch.max: ReduceMax does not convert down to opset 17
        scaled = size * (longest_side / torch.maximum(size[0], size[1]))
        return torch.floor(scaled + 0.5).to(torch.int64)

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

    def upscale_masks(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``[B, C, 4h, 4w]`` -> ``[B, C, H, W]`` at ``orig_im_size`` (as
        :meth:`RwkvSam.postprocess_masks`, with the sizes read from the tensor inside the graph)."""
        size = self.image_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        resized = self.resized_image_size(orig_im_size, size)
        resized_h, resized_w = resized[0].item(), resized[1].item()
        original = orig_im_size.to(torch.int64)
        original_h, original_w = original[0].item(), original[1].item()
        # Bounds on the data-dependent sizes, so the exporter can slice and resize with them.
        torch._check(resized_h >= 1)
        torch._check(resized_h <= size)
        torch._check(resized_w >= 1)
        torch._check(resized_w <= size)
        torch._check(original_h >= 1)
        torch._check(original_w >= 1)
        masks = masks[..., :resized_h, :resized_w]
        return F.interpolate(masks, (original_h, original_w), mode="bilinear", align_corners=False)

    def select_single_mask(
        self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's choice without control flow: token 0 (the single-mask output) when there are more than
        two prompt points (padding and box corners included), else the best-scored multimask output.

        ``score = scores + (N - 2.5) * [1000, 0, 0, 0]`` and its argmax; N is read from the labels'
        shape as a tensor, so the graph keeps N dynamic."""
        num_points = torch.ones_like(point_labels, dtype=scores.dtype).sum(dim=1, keepdim=True)  # [B, 1]
        reweight = (torch.arange(scores.shape[1], device=scores.device) == 0).to(scores.dtype) * 1000.0
        best = torch.argmax(scores + (num_points - 2.5) * reweight, dim=1, keepdim=True)  # [B, 1]
        chosen_masks = torch.take_along_dim(masks, best[:, :, None, None], dim=1)
        return chosen_masks, torch.take_along_dim(scores, best, dim=1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
        stage1_features: torch.Tensor | None = None,
        stage2_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """SAM's ONNX decoder: -> ``(masks, iou_predictions, low_res_masks)``, or with the extra
        metrics ``(masks, iou_predictions, stability_scores, areas, low_res_masks)`` (module docstring)."""
        if self.hq_fusion and (stage1_features is None or stage2_features is None):
            raise ValueError("this decoder has the high-quality fusion: pass stage1_features and stage2_features")
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        hq_features = (stage1_features, stage2_features) if self.hq_fusion else None
        low_res, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            hq_features=hq_features,
        )
        if self.use_stability_score:
            scores = calculate_stability_score(low_res, self.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, scores = self.select_single_mask(low_res, scores, point_labels)
        masks = self.upscale_masks(low_res, orig_im_size)
        if self.return_extra_metrics:
            stability_scores = calculate_stability_score(masks, self.mask_threshold, self.stability_score_offset)
            areas = (masks > self.mask_threshold).sum(dim=(-1, -2))
            return masks, scores, stability_scores, areas, low_res
        return masks, scores, low_res


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
    ``stage1_features [1, C1, S/4, S/4]``, ``stage2_features [1, C2, S/8, S/8]`` (the decoder graph's
    inputs of the same names). Returns the path written.
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
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
    opset: int | None = None,
    optimize: bool = True,
) -> Path:
    """Export the prompt encoder, mask decoder and mask postprocessing of an :class:`RwkvSam` to ONNX.

    The graph has the inputs and outputs of Segment Anything's exported decoder (module docstring);
    the number of points N and ``orig_im_size`` are dynamic. The embedding grid (h, w) is the prompt
    encoder's ``image_embedding_size``, and coordinates are in the frame whose longest side is the
    model's ``image_size`` (``ResizeLongestSide(model.image_size).apply_coords``).

    Args:
        model: an :class:`RwkvSam`.
        path: the ``.onnx`` file to write (its folder is created).
        return_single_mask, use_stability_score, return_extra_metrics: SAM's export options, as in
            :class:`SamDecoderOnnxModel`.
        gelu_approximate: export with tanh-approximated GELUs (for runtimes without a fast ``Erf``);
            the model itself is not changed. Masks then differ from PyTorch's slightly.
        opset: ONNX opset, or None for the exporter's default.
        optimize: run onnxscript's graph optimizer (as in :func:`export_image_encoder_onnx`).

    Returns the path written.
    """
    if not isinstance(gelu_approximate, bool):
        raise ValueError(f"gelu_approximate must be True or False, got {gelu_approximate!r}")
    wrapper = SamDecoderOnnxModel(
        model,
        return_single_mask=return_single_mask,
        use_stability_score=use_stability_score,
        return_extra_metrics=return_extra_metrics,
    ).eval()
    if gelu_approximate:
        wrapper = copy.deepcopy(wrapper)  # leave the caller's model exact
        for module in wrapper.modules():
            if isinstance(module, nn.GELU):
                module.approximate = "tanh"
    prompt_encoder = wrapper.prompt_encoder
    decoder = wrapper.mask_decoder
    device = next(wrapper.parameters()).device
    height, width = prompt_encoder.image_embedding_size
    generator = torch.Generator().manual_seed(0)
    size = float(wrapper.image_size)
    labels = torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]])  # an example N > 1, so the exporter keeps N symbolic
    args = [
        torch.randn(1, prompt_encoder.embed_dim, height, width, generator=generator),
        torch.rand(1, labels.shape[1], 2, generator=generator) * size,
        labels,
        torch.randn(1, 1, 4 * height, 4 * width, generator=generator),
        torch.ones(1),
        torch.tensor([1.5 * size, 2.25 * size]),  # any (H, W): the sizes are read inside the graph
    ]
    if wrapper.hq_fusion:
        args += [
            torch.randn(1, decoder.stage1_channels, 4 * height, 4 * width, generator=generator),
            torch.randn(1, decoder.stage2_channels, 2 * height, 2 * width, generator=generator),
        ]
    args = tuple(arg.to(device) for arg in args)
    num_points = torch.export.Dim("num_points", min=1, max=4096)
    dynamic_shapes = [None, {1: num_points}, {1: num_points}, None, None, None] + [None] * (len(args) - 6)
    with warnings.catch_warnings():
        # point_coords and point_labels share the one Dim on purpose; the exporter says so for each.
        warnings.filterwarnings("ignore", message=".*axis name: num_points will not be used.*")
        return _export(
            wrapper, args, path,
            input_names=wrapper.input_names, output_names=wrapper.output_names, dynamic_shapes=tuple(dynamic_shapes),
            opset=opset, optimize=optimize,
        )

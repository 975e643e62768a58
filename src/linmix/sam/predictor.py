"""Segment Anything's predictor API for RWKV-SAM: encode an image once, then decode many prompts.

    predictor = RwkvSamPredictor(build_rwkv_sam("small", checkpoint="rwkv_sam_small.safetensors"))
    predictor.set_image(image)                      # HxWx3 uint8 RGB numpy
    masks, scores, logits = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))

``predict`` takes prompts in original-image pixels (numpy) and returns numpy; ``predict_torch`` takes
batched prompts already mapped to the resized frame (``predictor.transform.apply_coords_torch`` /
``apply_boxes_torch``) and returns tensors. Mistakes a user can make (no image, a float image, a box
the wrong way round, a point off the image, ...) raise a ValueError saying what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linmix.sam.model import ImageFeatures, RwkvSam
from linmix.sam.transforms import ResizeLongestSide

__all__ = ["MAX_IMAGE_SIDE", "ImageNotSetError", "RwkvSamPredictor"]

MAX_IMAGE_SIDE = 16384  # larger images are almost surely a mistake (and would take minutes to resize)


class ImageNotSetError(ValueError, RuntimeError):
    """Prediction before ``set_image``. A ValueError like every input error here, and a RuntimeError
    like Segment Anything's, so either ``except`` catches it."""


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


class RwkvSamPredictor:
    """Compute an image's features once with :meth:`set_image`, then predict masks for prompts.

    Attributes (SAM's): ``model``, ``transform`` (:class:`ResizeLongestSide`), ``is_image_set``,
    ``original_size`` (H, W) of the image given, ``input_size`` (H', W') after resizing, ``features``.
    """

    def __init__(self, model: RwkvSam) -> None:
        if not isinstance(model, RwkvSam):
            raise ValueError(f"RwkvSamPredictor needs an RwkvSam model, got {type(model).__name__}")
        self.model = model
        self.transform = ResizeLongestSide(model.image_size)
        self.reset_image()

    # ----------------------------------------------------------------------------------------------
    # image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an image for later prompts.

        Args:
            image: HxWx3 uint8 numpy in ``image_format``; HxW or HxWx1 (grayscale) and HxWx4
                (RGBA / BGRA, alpha dropped) are converted. Sides in [1, 16384].
            image_format: "RGB" or "BGR" (OpenCV's order; the channels are flipped).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array HxWx3 of dtype uint8, got {_describe(image)}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"image must have dtype uint8 (0-255), got {image.dtype}; convert floats in [0, 1] with "
                "(image * 255).round().astype(np.uint8)"
            )
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"image must be HxWx3 (RGB), HxWx4 (RGBA), HxWx1 or HxW (grayscale), got shape {image.shape}"
            )
        height, width = image.shape[:2]
        if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
            raise ValueError(
                f"image sides must be between 1 and {MAX_IMAGE_SIDE} pixels, got (H, W) = ({height}, {width})"
            )
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.shape[2] == 4:
            image = image[:, :, :3]
        if image_format != self.model.image_format:
            image = image[:, :, ::-1]
        input_image = self.transform.apply_image(np.ascontiguousarray(image))
        input_image_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_image_torch, (height, width))

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Encode an already resized image: ``transformed_image [1, 3, H', W']`` RGB 0-255 with
        ``max(H', W') == image_size`` (:meth:`ResizeLongestSide.apply_image_torch`), and the (H, W)
        it was resized from."""
        size = self.model.image_size
        if (
            not isinstance(transformed_image, torch.Tensor)
            or transformed_image.dim() != 4
            or transformed_image.shape[0] != 1
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != size
        ):
            raise ValueError(
                f"transformed_image must be [1, 3, H, W] with the longest side resized to {size}, "
                f"got {_describe(transformed_image)}"
            )
        if len(original_image_size) != 2 or min(int(s) for s in original_image_size) < 1:
            raise ValueError(f"original_image_size must be (H, W) with positive sides, got {original_image_size!r}")
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))
        input_image = self.model.preprocess(transformed_image.to(self.device))
        self.features = self.model.get_image_features(input_image)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding ``[1, 256, 64, 64]`` of the image set."""
        self._require_image()
        return self.features.embedding

    def get_image_features(self) -> ImageFeatures:
        """Embedding and high-quality stage maps of the image set (:class:`linmix.sam.model.ImageFeatures`)."""
        self._require_image()
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the image set."""
        self.is_image_set = False
        self.features: ImageFeatures | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def _require_image(self) -> None:
        if not self.is_image_set or self.features is None:
            raise ImageNotSetError("an image must be set with .set_image(...) before mask prediction")

    # ----------------------------------------------------------------------------------------------
    # prompts

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the image set.

        Args:
            point_coords: Nx2 (x, y) pixels of the original image; point_labels: N, 1 foreground / 0 background.
            box: length-4 XYXY pixels of the original image.
            mask_input: 1x256x256 logits, typically ``low_res_logits[best][None]`` from an earlier call.
            multimask_output: 3 masks (for ambiguous prompts such as one point) when True, else 1.
            return_logits: return mask logits instead of masks thresholded at ``mask_threshold``.

        Returns:
            masks CxHxW (bool, or float logits) at the original size, iou_predictions C (float32),
            low_res_logits Cx256x256 (float32); C = 3 or 1.
        """
        self._require_image()
        height, width = self.original_size
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_labels is not None and point_coords is None:
            raise ValueError("point_labels were given without point_coords")
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords need point_labels (1 foreground, 0 background), one per point")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise ValueError(f"point_coords must be Nx2 (x, y), got shape {coords.shape}")
            if labels.ndim != 1 or labels.shape[0] != coords.shape[0]:
                raise ValueError(
                    f"point_labels must have one label per point: {coords.shape[0]} points but labels of shape {labels.shape}"
                )
            _check_inside("point_coords", coords, height, width)
            coords_torch = torch.as_tensor(self.transform.apply_coords(coords, self.original_size), dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(labels.astype(np.int64), dtype=torch.int, device=self.device)[None]
        if box is not None:
            box_array = np.asarray(box, dtype=np.float64)
            if box_array.size != 4 or box_array.ndim > 2 or (box_array.ndim == 2 and box_array.shape[0] != 1):
                raise ValueError(f"box must be 4 numbers XYXY (shape (4,) or (1, 4)), got shape {box_array.shape}")
            box_array = box_array.reshape(4)
            _check_box("box", box_array[None], height, width)
            box_torch = torch.as_tensor(self.transform.apply_boxes(box_array, self.original_size), dtype=torch.float, device=self.device)
        if mask_input is not None:
            mask_array = np.asarray(mask_input)
            expected = (1, *self.model.prompt_encoder.mask_input_size)
            if mask_array.shape != expected:
                raise ValueError(
                    f"mask_input must have shape {'x'.join(map(str, expected))} (low-res logits of an earlier "
                    f"prediction, e.g. low_res_logits[i][None]), got {mask_array.shape}"
                )
            mask_torch = torch.as_tensor(mask_array, dtype=torch.float, device=self.device)[None]

        masks, iou_predictions, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output=multimask_output, return_logits=return_logits
        )
        return (
            masks[0].detach().float().cpu().numpy() if return_logits else masks[0].detach().cpu().numpy(),
            iou_predictions[0].detach().float().cpu().numpy(),
            low_res[0].detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompts at once, all in the resized input frame.

        Args:
            point_coords: BxNx2 (x, y), already mapped with ``transform.apply_coords_torch``; point_labels BxN.
            boxes: Bx4 XYXY, mapped with ``transform.apply_boxes_torch`` (several boxes per image: B > 1).
            mask_input: Bx1x256x256 logits.
            multimask_output, return_logits: as in :meth:`predict`.

        Returns:
            masks BxCxHxW (bool, or logits) at the original size, iou_predictions BxC, low_res_logits BxCx256x256.
        """
        self._require_image()
        input_h, input_w = self.input_size
        if point_labels is not None and point_coords is None:
            raise ValueError("point_labels were given without point_coords")
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords need point_labels (BxN: 1 foreground, 0 background)")
            if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
                raise ValueError(f"point_coords must be BxNx2 (x, y), got {_describe(point_coords)}")
            if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
                raise ValueError(
                    f"point_labels must be BxN = {tuple(point_coords.shape[:2])} (one label per point), "
                    f"got {tuple(point_labels.shape)}"
                )
            real = (point_labels != -1).unsqueeze(-1).expand_as(point_coords)  # padding points may sit anywhere
            _check_inside("point_coords", point_coords[real].reshape(-1, 2).detach().cpu().double().numpy(), input_h, input_w, frame="resized input")
            point_coords = point_coords.to(self.device)
            point_labels = point_labels.to(self.device)
        if boxes is not None:
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be Bx4 (XYXY), got {_describe(boxes)}")
            _check_box("boxes", boxes.detach().cpu().double().numpy(), input_h, input_w, frame="resized input")
            boxes = boxes.to(self.device)
        if mask_input is not None:
            expected = (1, *self.model.prompt_encoder.mask_input_size)
            if mask_input.dim() != 4 or tuple(mask_input.shape[1:]) != expected:
                raise ValueError(
                    f"mask_input must be Bx{'x'.join(map(str, expected))} logits, got {_describe(mask_input)}"
                )
            mask_input = mask_input.to(self.device)
        if point_coords is None and boxes is None and mask_input is None:
            raise ValueError("give at least one prompt: point_coords with point_labels, a box, or a mask_input")

        low_res, iou_predictions = self.model.decode(
            self.features,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_inputs=mask_input,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res


def _check_inside(name: str, coords: np.ndarray, height: int, width: int, frame: str = "image") -> None:
    """Points [N, 2] must be finite and inside the (height, width) frame, edges included."""
    if coords.size == 0:
        return
    if not np.isfinite(coords).all():
        raise ValueError(f"{name} must be finite numbers, got NaN or infinity")
    slack = 1e-3  # rounding when mapping an edge point to the resized frame
    x, y = coords[:, 0], coords[:, 1]
    outside = (x < -slack) | (x > width + slack) | (y < -slack) | (y > height + slack)
    if outside.any():
        first = coords[outside][0]
        raise ValueError(
            f"{name} must lie inside the {frame} (0 <= x <= {width}, 0 <= y <= {height}); "
            f"{int(outside.sum())} point(s) do not, e.g. (x, y) = ({first[0]:g}, {first[1]:g})"
        )


def _check_box(name: str, boxes: np.ndarray, height: int, width: int, frame: str = "image") -> None:
    """Boxes [B, 4] XYXY: x0 <= x1, y0 <= y1, corners inside the frame."""
    if not np.isfinite(boxes).all():
        raise ValueError(f"{name} must be finite numbers, got NaN or infinity")
    inverted = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    if inverted.any():
        raise ValueError(f"{name} must be XYXY with x0 <= x1 and y0 <= y1, got {boxes[inverted][0].tolist()}")
    _check_inside(name, boxes.reshape(-1, 2), height, width, frame)

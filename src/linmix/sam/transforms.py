"""Segment Anything's input transform: resize so the longest side is ``target_length`` (1024).

Images are HWC uint8 numpy arrays (``apply_image``) or BxCxHxW tensors (``apply_image_torch``);
coordinates are ``[..., 2]`` (x, y) pixels and boxes ``[..., 4]`` XYXY pixels of the original
image, mapped to the resized image by scaling x by ``new_w / old_w`` and y by ``new_h / old_h``.

SAM resizes with PIL (bilinear, which antialiases when shrinking); linmix uses torch's bilinear
interpolation with ``antialias=True`` (no PIL dependency), which is close but not bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ResizeLongestSide"]


class ResizeLongestSide:
    """Resize images so the longest side is ``target_length``, and map coordinates and boxes with them."""

    def __init__(self, target_length: int = 1024) -> None:
        if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= 0:
            raise ValueError(f"target_length must be a positive integer, got {target_length!r}")
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) after scaling the longest side to ``long_side_length``, each side rounded half up."""
        if oldh <= 0 or oldw <= 0:
            raise ValueError(f"image sides must be positive, got (H, W) = ({oldh}, {oldw})")
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return int(newh + 0.5), int(neww + 0.5)

    # ----------------------------------------------------------------------------------------------
    # numpy

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC (or HxW) uint8 -> resized uint8 of the same layout, longest side ``target_length``."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(
                f"apply_image expects a uint8 numpy array HxWxC, got "
                f"{type(image).__name__}{'' if not isinstance(image, np.ndarray) else ' of dtype ' + str(image.dtype)}"
            )
        if image.ndim not in (2, 3):
            raise ValueError(f"apply_image expects an HxW or HxWxC array, got shape {image.shape}")
        target = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        tensor = tensor[:, :, None] if image.ndim == 2 else tensor
        resized = self._resize(tensor.permute(2, 0, 1)[None], target)[0].permute(1, 2, 0)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
        return resized[:, :, 0] if image.ndim == 2 else resized

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """coords [..., 2] (x, y) pixels of an image of ``original_size`` (H, W) -> float64 copy in the resized frame."""
        coords = np.array(coords, dtype=np.float64)  # a copy, as SAM's
        if coords.shape[-1:] != (2,):
            raise ValueError(f"coords must have shape [..., 2] (x, y), got {coords.shape}")
        new_h, new_w = self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)
        coords[..., 0] = coords[..., 0] * (new_w / original_size[1])
        coords[..., 1] = coords[..., 1] * (new_h / original_size[0])
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """boxes [..., 4] XYXY -> [N, 4] float64 in the resized frame (SAM flattens the leading dims)."""
        boxes = np.asarray(boxes)
        if boxes.shape[-1:] != (4,):
            raise ValueError(f"boxes must have shape [..., 4] (XYXY), got {boxes.shape}")
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    # ----------------------------------------------------------------------------------------------
    # torch

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW -> BxCxH'xW' float (bilinear, antialiased), longest side ``target_length``.

        Unlike :meth:`apply_image` the result is not rounded back to uint8 (as in SAM).
        """
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(f"apply_image_torch expects a BxCxHxW tensor, got {getattr(image, 'shape', type(image))}")
        target = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return self._resize(image, target)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """coords [..., 2] (x, y) -> a float copy in the resized frame."""
        if coords.shape[-1:] != (2,):
            raise ValueError(f"coords must have shape [..., 2] (x, y), got {tuple(coords.shape)}")
        new_h, new_w = self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)
        coords = coords.to(torch.float).clone()
        coords[..., 0] = coords[..., 0] * (new_w / original_size[1])
        coords[..., 1] = coords[..., 1] * (new_h / original_size[0])
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """boxes [..., 4] XYXY -> [N, 4] float in the resized frame."""
        if boxes.shape[-1:] != (4,):
            raise ValueError(f"boxes must have shape [..., 4] (XYXY), got {tuple(boxes.shape)}")
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image.to(torch.float32) if not image.is_floating_point() else image
        compute = image if image.is_floating_point() else image.to(torch.float32)
        return F.interpolate(compute, size, mode="bilinear", align_corners=False, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_length={self.target_length})"

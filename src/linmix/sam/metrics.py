"""Mask IoU and boundary IoU as the HQ-SAM protocol computes them (spec RWKV-SAM section 5).

All masks are ``[H, W]`` bool (numpy or torch) at the image's original resolution.

- ``mask_iou = |P & G| / |P | G|``.
- ``boundary(m) = m & ~erode(m, 3x3 square, d iterations)``, the image outside counted as background
  (HQ-SAM pads one zero pixel before eroding), with ``d = max(1, round(0.02 * sqrt(H^2 + W^2)))``.
- ``boundary_iou = |B(P) & B(G)| / |B(P) | B(G)|``.

Both are 1.0 when the union is empty (an empty prediction of an empty mask is exact); the reference
code divides by zero there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["boundary_dilation", "boundary_iou", "erode", "mask_boundary", "mask_iou"]


def _as_bool_tensor(name: str, mask) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] mask, got shape {tuple(tensor.shape)}")
    return tensor.bool()


def _check_pair(prediction, ground_truth) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _as_bool_tensor("prediction", prediction), _as_bool_tensor("ground_truth", ground_truth)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground_truth {tuple(g.shape)} must have the same [H, W]")
    return p, g


def boundary_dilation(height: int, width: int, ratio: float = 0.02) -> int:
    """The band width d = max(1, round(ratio * image diagonal)) (Python's round, as the reference)."""
    return max(1, int(round(ratio * math.sqrt(height**2 + width**2))))


def erode(mask, iterations: int) -> torch.Tensor:
    """Binary erosion by a 3x3 square ``iterations`` times (= one (2d+1)-square), outside = background.

    ``[H, W]`` bool -> ``[H, W]`` bool. Computed as the complement of a separable max-pool of the
    complement, so the cost is O(H W d), not O(H W d^2).
    """
    mask = _as_bool_tensor("mask", mask)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if iterations == 0:
        return mask.clone()
    kernel = 2 * iterations + 1
    background = (~mask).float()[None, None]
    background = F.pad(background, (iterations, iterations, iterations, iterations), value=1.0)
    background = F.max_pool2d(background, (kernel, 1), stride=1)
    background = F.max_pool2d(background, (1, kernel), stride=1)
    return background[0, 0] == 0


def mask_boundary(mask, dilation: int | None = None) -> torch.Tensor:
    """The inner boundary band ``mask & ~erode(mask, dilation)``; ``dilation`` defaults to
    :func:`boundary_dilation` of the mask's size."""
    mask = _as_bool_tensor("mask", mask)
    if dilation is None:
        dilation = boundary_dilation(*mask.shape)
    return mask & ~erode(mask, dilation)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


def mask_iou(prediction, ground_truth) -> float:
    """IoU of two ``[H, W]`` masks (1.0 when both are empty)."""
    p, g = _check_pair(prediction, ground_truth)
    return _iou(p, g)


def boundary_iou(prediction, ground_truth, dilation: int | None = None) -> float:
    """Boundary IoU of two ``[H, W]`` masks with the band width of the image (see the module doc)."""
    p, g = _check_pair(prediction, ground_truth)
    if dilation is None:
        dilation = boundary_dilation(*g.shape)
    return _iou(mask_boundary(p, dilation), mask_boundary(g, dilation))

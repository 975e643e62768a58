"""Prompts and augmentation for training and evaluation (the RWKV-SAM / HQ-SAM recipe, spec section 4).

Prompts: a tight box with noise, or 1-5 positive points inside the mask with optional negative
points outside it. Augmentation: horizontal flip, large-scale jitter (resize by 0.5-2x of the
fit-to-frame scale), crop / pad to the square model frame, normalised with SAM's pixel statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from linmix.sam.data.formats import DatasetError, SegmentationSample

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "augment_sample",
    "default_box_noise_cap",
    "prepare_image",
    "sample_box_prompt",
    "sample_point_prompt",
    "tight_box",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's, in 0-255 units
PIXEL_STD = (58.395, 57.12, 57.375)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool -> ``[4]`` float XYXY of the extreme foreground pixels (inclusive, SAM's convention)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def default_box_noise_cap(image_size: int) -> float:
    """SAM's box-noise cap (20 px in a 1024 px frame) scaled to a ``image_size`` frame."""
    return 20.0 * image_size / 1024


def sample_box_prompt(
    mask: np.ndarray, rng: np.random.Generator, *, noise: float = 0.1, max_noise: float = 20.0
) -> np.ndarray:
    """The tight box of ``mask`` with each edge moved by N(0, noise * side), capped at ``max_noise``
    pixels, kept inside the image and non-inverted: ``[4]`` XYXY float."""
    box = tight_box(mask)
    height, width = mask.shape
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32)
    jitter = np.clip(rng.normal(0, 1, size=4) * noise * sides, -max_noise, max_noise)
    noisy = box + jitter.astype(np.float32)
    noisy[[0, 2]] = np.clip(noisy[[0, 2]], 0, width - 1)
    noisy[[1, 3]] = np.clip(noisy[[1, 3]], 0, height - 1)
    x0, x1 = sorted(noisy[[0, 2]])
    y0, y1 = sorted(noisy[[1, 3]])
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sample_point_prompt(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    max_positive: int = 5,
    max_negative: int = 2,
    negative_probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """1..max_positive points on foreground pixels and, with ``negative_probability``, 1..max_negative
    points on background pixels near the object (inside its box grown by half): -> coords ``[N, 2]``
    (x, y) float pixel indices, labels ``[N]`` int (1 positive, 0 negative)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot place points in an empty mask")
    n_positive = int(rng.integers(1, max_positive + 1))
    chosen = rng.choice(len(xs), size=n_positive, replace=len(xs) < n_positive)
    coords = [np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32)]
    labels = [np.ones(n_positive, dtype=np.int64)]
    if max_negative > 0 and rng.random() < negative_probability:
        x0, y0, x1, y1 = tight_box(mask)
        grow_x, grow_y = 0.5 * (x1 - x0) + 2, 0.5 * (y1 - y0) + 2
        height, width = mask.shape
        region = np.zeros_like(mask)
        region[int(max(0, y0 - grow_y)) : int(min(height, y1 + grow_y + 1)), int(max(0, x0 - grow_x)) : int(min(width, x1 + grow_x + 1))] = True
        ny, nx = np.nonzero(region & ~mask)
        if len(nx):
            n_negative = int(rng.integers(1, max_negative + 1))
            chosen = rng.choice(len(nx), size=n_negative, replace=len(nx) < n_negative)
            coords.append(np.stack([nx[chosen], ny[chosen]], axis=1).astype(np.float32))
            labels.append(np.zeros(n_negative, dtype=np.int64))
    return np.concatenate(coords), np.concatenate(labels)


# --------------------------------------------------------------------------------------------------
# frames and augmentation


def prepare_image(image: torch.Tensor, frame: int) -> torch.Tensor:
    """``[3, h, w]`` float 0-255 with h, w <= frame -> ``[3, frame, frame]`` normalised with SAM's
    pixel mean / std and zero-padded at the bottom and right (the model's own preprocessing)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    normalised = (image.float() - mean) / std
    return F.pad(normalised, (0, frame - image.shape[-1], 0, frame - image.shape[-2]))


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def augment_sample(
    sample: SegmentationSample,
    rng: np.random.Generator,
    *,
    frame: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_probability: float = 0.5,
    min_area: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, large-scale jitter and crop/pad into the square model frame.

    The image is scaled by ``s * frame / max(H, W)`` with ``s`` log-uniform in ``scale_range``, then
    randomly cropped to ``frame`` where larger, and padded at the bottom/right. ``scale_range=(1, 1)``
    and ``flip_probability=0`` give SAM's plain resize-longest-side. Objects left with fewer than
    ``min_area`` pixels are dropped (a crop may remove them); if every object would go, the sample is
    taken without jitter (and if they are all that small anyway, the largest one is kept).

    Returns: image ``[3, frame, frame]`` normalised (see :func:`prepare_image`), masks ``[K', frame, frame]``
    float in [0, 1] (area-resampled, so edges are soft; threshold at 0.5 for binary masks).
    """
    image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()
    masks = torch.from_numpy(np.ascontiguousarray(sample.masks)).float()
    if rng.random() < flip_probability:
        image, masks = image.flip(-1), masks.flip(-1)
    height, width = image.shape[-2:]
    low, high = scale_range
    jitter = float(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else float(low)
    for scale in (jitter, 1.0):
        factor = scale * frame / max(height, width)
        size = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
        top = int(rng.integers(0, size[0] - frame + 1)) if size[0] > frame else 0
        left = int(rng.integers(0, size[1] - frame + 1)) if size[1] > frame else 0
        crop = (slice(top, top + frame), slice(left, left + frame))
        resized_masks = _resize(masks, size)[:, crop[0], crop[1]]
        areas = (resized_masks > 0.5).flatten(1).sum(1)
        keep = areas >= min_area
        if keep.any():
            break
    if not keep.any():  # every object is small at this frame size: keep the largest one that is visible
        if int(areas.max()) == 0:
            raise DatasetError(f"{sample.name}: no object is visible after resizing to a {frame} px frame")
        keep = areas == areas.max()
    resized_image = _resize(image, size)[:, crop[0], crop[1]]
    out_h, out_w = resized_image.shape[-2:]
    resized_masks = F.pad(resized_masks[keep], (0, frame - out_w, 0, frame - out_h))
    return prepare_image(resized_image, frame), resized_masks

"""Pictures of masks: overlays of masks and prompts on an image, and mask PNGs.

Images are HxWx3 uint8 RGB numpy arrays; masks are HxW (or NxHxW) bool arrays of the same H, W.
Points are (x, y) pixels with labels 1 (foreground, drawn green) or 0 (background, drawn red);
boxes are XYXY pixels. Only numpy and Pillow: no OpenCV.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = [
    "MASK_COLORS",
    "decode_png",
    "encode_png",
    "mask_boundary",
    "mask_to_png_bytes",
    "overlay_masks",
    "png_base64",
    "save_png",
]

# Distinct, colour-blind-friendly-ish colours (Okabe-Ito first, then tab10's) for successive masks.
MASK_COLORS: tuple[tuple[int, int, int], ...] = (
    (30, 144, 255), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
    (240, 228, 66), (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)
FOREGROUND_COLOR = (0, 200, 80)
BACKGROUND_COLOR = (230, 40, 40)
BOX_COLOR = (255, 215, 0)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an HxWx3 uint8 RGB array, got {what}")


def mask_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of a bool mask ``[H, W]`` within ``width`` pixels of its edge (inside the mask)."""
    mask = np.asarray(mask, dtype=bool)
    eroded = mask.copy()
    for _ in range(max(1, int(width))):
        # 4-neighbour erosion; pixels on the image border count as edge pixels.
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray],
    *,
    colors: Sequence[tuple[int, int, int]] | None = None,
    alpha: float = 0.5,
    outline: bool = True,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Tint each mask over ``image`` and draw its outline, then the prompts on top.

    Args:
        image: HxWx3 uint8 RGB.
        masks: NxHxW (or one HxW) bool; later masks are drawn over earlier ones.
        colors: one RGB colour per mask (default :data:`MASK_COLORS`, cycled).
        alpha: opacity of the tint in [0, 1].
        points: Nx2 (x, y) pixels, drawn as discs (green foreground, red background by ``labels``).
        boxes: Bx4 XYXY pixels, drawn as rectangles.

    Returns:
        A new HxWx3 uint8 RGB image.
    """
    from PIL import Image, ImageDraw

    _check_image(image)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    stack = np.asarray(masks, dtype=bool)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be NxHxW with (H, W) = {image.shape[:2]}, got shape {stack.shape}")
    palette = list(colors) if colors is not None else list(MASK_COLORS)
    if not palette:
        raise ValueError("colors must name at least one colour")
    out = image.astype(np.float32)
    for index, mask in enumerate(stack):
        color = np.asarray(palette[index % len(palette)], dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        if outline:
            out[mask_boundary(mask, width=max(1, round(min(image.shape[:2]) / 256)))] = color
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(image.shape[:2]) / 160))
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=line)
    if points is not None:
        coords = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        point_labels = np.ones(len(coords), dtype=int) if labels is None else np.asarray(labels).reshape(-1)
        if len(point_labels) != len(coords):
            raise ValueError(f"labels must have one entry per point: {len(coords)} points, {len(point_labels)} labels")
        radius = max(4, round(min(image.shape[:2]) / 60))
        for (x, y), label in zip(coords, point_labels):
            fill = FOREGROUND_COLOR if int(label) == 1 else BACKGROUND_COLOR
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=(255, 255, 255), width=max(1, line // 2))
    return np.asarray(canvas)


def encode_png(image: np.ndarray) -> bytes:
    """HxW (bool or uint8) or HxWx3 / HxWx4 uint8 -> PNG bytes (bool masks become 0 / 255 grey)."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"encode_png needs a bool or uint8 HxW / HxWxC array, got shape {array.shape} dtype {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # optimize=True costs 10x the time for ~10% smaller files
    return buffer.getvalue()


def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    """A bool mask ``[H, W]`` -> an 8-bit greyscale PNG (255 inside, 0 outside)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    return encode_png(mask.astype(bool))


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> numpy array (HxW for greyscale, HxWxC otherwise)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def save_png(image: np.ndarray, path: str | PathLike[str]) -> Path:
    """Write ``image`` (as :func:`encode_png` takes it) to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path

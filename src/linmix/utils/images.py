"""Reading image files: the one reader every part of linmix uses (CLI, datasets, tour, web demo).

Images come back upright, as image viewers and browsers show them: a camera JPEG stored sideways
with an EXIF orientation tag is turned by that tag, so pixel coordinates (prompts, masks) mean the
same thing to a person looking at the image and to the model. Every Pillow mode is converted:
greyscale, palette, alpha (dropped, not composited) and 16-bit greyscale (scaled to 8 bits).

Errors name the file: FileNotFoundError for a missing file, :class:`UnreadableImageError` (a
ValueError) for a folder, a non-image or a truncated image.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["SIXTEEN_BIT_MODES", "UnreadableImageError", "image_size", "open_image", "read_rgb", "upright", "upright_rgb"]

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5-8 turn the stored picture by 90 or 270 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Pillow modes of 16-bit greyscale files (16-bit PNGs open as "I;16", or "I" in older Pillow).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(ValueError):
    """A file that exists but is not an image Pillow can decode (or a folder); the message names it."""


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError as error:  # Pillow is an optional dependency (the sam, serve and demo extras)
        raise ImportError("reading images needs Pillow: pip install 'linmix[sam]' (or pip install Pillow)") from error
    return Image, ImageOps


def open_image(path: str | PathLike[str]) -> PILImage.Image:
    """Open and fully decode an image file (so truncated files fail here, naming the file).

    Raises FileNotFoundError when ``path`` does not exist and UnreadableImageError when it is a folder
    or not a readable image. The pixels are as stored (no EXIF orientation applied: see :func:`upright_rgb`).
    """
    Image, _ = _pillow()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise UnreadableImageError(f"{path} is a folder, not an image file")
    image = None
    try:
        image = Image.open(path)
        image.load()
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        if image is not None:
            image.close()
        if isinstance(error, Image.DecompressionBombError):
            raise UnreadableImageError(f"{path} is too large to decode safely: {error}") from error
        raise UnreadableImageError(f"{path} is not an image file Pillow can read (PNG, JPEG, WebP, ...): {error}") from error
    return image


def upright(image: PILImage.Image) -> PILImage.Image:
    """``image`` turned as its EXIF orientation tag says (a copy; the same pixels when it has none).

    Decodes the pixels first: Pillow's errors for truncated data pass through unchanged."""
    _, ImageOps = _pillow()
    image.load()
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as error:  # a corrupt EXIF block
        name = getattr(image, "filename", "") or "the image"
        raise UnreadableImageError(f"cannot apply the EXIF orientation of {name}: {error}") from error


def _sixteen_bit_to_uint8(image: PILImage.Image) -> np.ndarray:
    """16-bit greyscale (Pillow modes I;16*, or I from 16-bit PNGs) -> ``[H, W]`` uint8, 65535 -> 255.

    Pillow's own conversion to 8 bits clips instead of scaling, which turns most 16-bit images white."""
    values = np.asarray(image, dtype=np.float64)
    return np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def upright_rgb(image: PILImage.Image) -> np.ndarray:
    """A Pillow image -> ``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied), any mode converted.

    Raises UnreadableImageError for a mode that has no RGB conversion."""
    turned = upright(image)
    if turned.mode in SIXTEEN_BIT_MODES:
        return np.repeat(_sixteen_bit_to_uint8(turned)[..., None], 3, axis=2)
    try:
        return np.array(turned.convert("RGB"), dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except (OSError, ValueError) as error:
        raise UnreadableImageError(f"cannot convert a {turned.mode} image to RGB: {error}") from error


def read_rgb(path: str | PathLike[str]) -> np.ndarray:
    """An image file -> ``[H, W, 3]`` uint8 RGB, upright as viewers show it (EXIF orientation applied;
    greyscale, palette, alpha and 16-bit images converted). A fresh, writable array.

    Raises FileNotFoundError for a missing file and UnreadableImageError (a ValueError) for a file
    Pillow cannot read.
    """
    with open_image(path) as image:
        return upright_rgb(image)


def image_size(path: str | PathLike[str]) -> tuple[int, int]:
    """``(H, W)`` of an image file as :func:`read_rgb` returns it (EXIF orientation applied), decoding
    the pixels so that a truncated file raises UnreadableImageError here."""
    with open_image(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION_TAG, 1) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width

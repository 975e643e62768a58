"""linmix.utils.images: the package's one image reader, checked pixel by pixel against numpy's own
rotations and flips for every EXIF orientation, every Pillow mode it converts, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from linmix.utils.images import UnreadableImageError, image_size, open_image, read_rgb, upright_rgb

# What each EXIF orientation asks a viewer to do to the stored pixels [H, W, C], written with numpy
# (an oracle independent of Pillow's transpose table).
ORIENTATION_TO_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise to view
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise to view
}


def asymmetric_rgb(height=3, width=5, seed=0):
    """Every pixel distinct, so any wrong rotation or flip changes the array."""
    values = np.random.default_rng(seed).permutation(256)[: height * width * 3]
    return values.reshape(height, width, 3).astype(np.uint8)


def save_with_orientation(path, pixels, orientation, **save_options):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **save_options)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_pixels(tmp_path, orientation):
    stored = asymmetric_rgb()
    path = save_with_orientation(tmp_path / f"o{orientation}.png", stored, orientation)  # PNG: lossless
    expected = ORIENTATION_TO_UPRIGHT[orientation](stored)
    pixels = read_rgb(path)
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.dtype == np.uint8 and pixels.flags.writeable and pixels.flags.c_contiguous
    assert image_size(path) == expected.shape[:2]


def test_modes_convert_to_rgb(tmp_path):
    grey = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = asymmetric_rgb(2, 3)
    rgba[..., 3] = [[0, 128, 255], [255, 0, 7]]  # alpha is dropped, not composited
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgba[..., :3])

    grey_alpha = np.stack([grey, 255 - grey], axis=-1)
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "la.png"), np.repeat(grey[..., None], 3, axis=2))

    palette_colours = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30]], np.uint8)
    indices = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette(palette_colours.flatten().tolist())
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "palette.png"), palette_colours[indices])

    bilevel = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(bilevel).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "bilevel.png"), np.repeat(bilevel[..., None] * 255, 3, axis=2).astype(np.uint8))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    # Pillow's own 8-bit conversion clips 16-bit values at 255, which turns most of a 16-bit image white.
    deep = np.array([[0, 257, 32896], [65535, 1000, 128]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with open_image(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    expected = np.round(deep / 257.0).astype(np.uint8)  # 65535 -> 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "deep.png"), np.repeat(expected[..., None], 3, axis=2))


def test_jpeg_with_orientation_reads_upright(tmp_path):
    # A flat-coloured left half and right half survive JPEG well enough to see which way it turned.
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (250, 0, 0)
    stored[:, 16:] = (0, 0, 250)
    pixels = read_rgb(save_with_orientation(tmp_path / "camera.jpg", stored, 6, quality=95))
    assert pixels.shape == (32, 16, 3)
    # Rotated clockwise: the stored left (red) half is now the top half.
    assert pixels[:12, :, 0].min() > 200 and pixels[20:, :, 2].min() > 200


def test_upright_rgb_of_an_open_image(tmp_path):
    stored = asymmetric_rgb(4, 2, seed=1)
    path = save_with_orientation(tmp_path / "turned.png", stored, 8)
    with Image.open(path) as image:  # lazily opened, as the web demo holds an upload
        np.testing.assert_array_equal(upright_rgb(image), np.rot90(stored, 1))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        read_rgb(tmp_path / "missing.png")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="notes.jpg is not an image file"):
        read_rgb(tmp_path / "notes.jpg")
    with pytest.raises(UnreadableImageError, match="is a folder"):
        read_rgb(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        read_rgb(tmp_path / "cut.png")
    with pytest.raises(UnreadableImageError, match="cut.png"):
        image_size(tmp_path / "cut.png")  # decodes the pixels, so truncation is caught here too
    assert issubclass(UnreadableImageError, ValueError)

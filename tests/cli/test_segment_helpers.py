"""linmix.visualize, linmix.segment and the bundled examples: hand-computed overlays, prompt parsing,
image reading, and the example files against their drawing code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from linmix.data.examples import EXAMPLES, example_path, load_example_image, render_example
from linmix.segment import SegmentationResult, parse_box, parse_point, read_image, segment, write_segmentation
from linmix.visualize import decode_png, mask_boundary, mask_to_png_bytes, overlay_masks
from tiny_sam import tiny_sam


def test_overlay_tints_inside_only_by_hand():
    image = np.full((6, 8, 3), 100, dtype=np.uint8)
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:5, 2:7] = True
    out = overlay_masks(image, mask, colors=[(200, 0, 50)], alpha=0.5, outline=False)
    np.testing.assert_array_equal(out[mask], np.tile([150, 50, 75], (mask.sum(), 1)))  # 0.5 * 100 + 0.5 * colour
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert image[0, 0, 0] == 100  # the input is not modified
    outlined = overlay_masks(image, mask, colors=[(200, 0, 50)], alpha=0.5)
    edge = mask_boundary(mask)
    np.testing.assert_array_equal(outlined[edge], np.tile([200, 0, 50], (edge.sum(), 1)))
    np.testing.assert_array_equal(outlined[mask & ~edge], out[mask & ~edge])


def test_mask_boundary_by_hand():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False  # the only pixel whose 4 neighbours are all inside
    np.testing.assert_array_equal(mask_boundary(mask), expected)
    np.testing.assert_array_equal(mask_boundary(np.ones((3, 3), bool)), [[1, 1, 1], [1, 0, 1], [1, 1, 1]])


def test_overlay_draws_prompts_and_checks_shapes():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    out = overlay_masks(image, np.zeros((0, 60, 80), bool), points=[(20, 30), (60, 30)], labels=[1, 0], boxes=[(5, 5, 75, 55)])
    assert tuple(out[30, 20]) == (0, 200, 80) and tuple(out[30, 60]) == (230, 40, 40)  # foreground green, background red
    assert tuple(out[5, 40]) == (255, 215, 0)  # box edge
    with pytest.raises(ValueError, match="NxHxW"):
        overlay_masks(image, np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        overlay_masks(image.astype(np.float32), np.zeros((60, 80), bool))
    with pytest.raises(ValueError, match="one entry per point"):
        overlay_masks(image, np.zeros((60, 80), bool), points=[(1, 1)], labels=[1, 0])


def test_mask_png_round_trip():
    mask = np.random.default_rng(0).random((7, 9)) > 0.5
    decoded = decode_png(mask_to_png_bytes(mask))
    assert decoded.shape == (7, 9) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded == 255, mask)
    np.testing.assert_array_equal(decoded[~mask], 0)


@pytest.mark.parametrize("text, expected", [("1,2,3,4", (1, 2, 3, 4)), (" 0.5, 1 ,10,20.25", (0.5, 1, 10, 20.25))])
def test_parse_box(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,3,4,5", "4,4,1,1", "nan,1,2,3", ""])
def test_parse_box_rejects(text):
    with pytest.raises(ValueError, match="box"):
        parse_box(text)


def test_parse_point():
    assert parse_point("3,4") == (3.0, 4.0, 1)
    assert parse_point("3,4,0") == (3.0, 4.0, 0)
    assert parse_point("3.5, 4.5, 1") == (3.5, 4.5, 1)
    for bad in ("3", "3,4,2", "x,4", "1,2,3,4", "inf,1"):
        with pytest.raises(ValueError, match="point"):
            parse_point(bad)


def test_read_image_converts_and_reports(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = read_image(tmp_path / "grey.png")
    assert rgb.shape == (3, 4, 3) and rgb.flags.writeable
    np.testing.assert_array_equal(rgb[..., 1], grey)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png")[..., 0], 255)
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        read_image(tmp_path / "text.jpg")


def test_segment_reuses_a_predictor_and_writes_files(tmp_path):
    from linmix.sam import RwkvSamPredictor

    model = tiny_sam(seed=4)
    image = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    predictor = RwkvSamPredictor(model)
    predictor.set_image(image)
    from_predictor = segment(predictor, points=[(10, 10)])
    from_model = segment(model, image, points=[(10, 10)])
    assert from_predictor.masks.shape == (3, 24, 32)  # a lone point: 3 candidates
    np.testing.assert_array_equal(from_predictor.masks, from_model.masks)
    np.testing.assert_allclose(from_predictor.scores, from_model.scores, atol=1e-6)
    boxed = segment(predictor, box=(2, 2, 20, 20), points=[(10, 10), (25, 20)], labels=[1, 0])
    assert boxed.masks.shape == (1, 24, 32) and boxed.best == 0
    paths = write_segmentation(from_predictor, image, tmp_path, stem="x")
    assert {"mask", "overlay", "scores", "mask0", "mask1", "mask2"} <= set(paths)
    np.testing.assert_array_equal(decode_png(paths["mask"].read_bytes()) == 255, from_predictor.best_mask)
    with pytest.raises(ValueError, match="give a prompt"):
        segment(predictor)
    with pytest.raises(ValueError, match="an image is needed"):
        segment(model, points=[(1, 1)])


def test_result_summary():
    masks = np.zeros((2, 3, 4), bool)
    masks[1, :2, :2] = True
    result = SegmentationResult(masks=masks, scores=np.array([0.2, 0.7]), points=np.array([[1.0, 1.0]]), labels=np.array([1]))
    summary = result.summary()
    assert summary["best"] == 1 and summary["areas"] == [0, 4] and summary["image_size"] == {"height": 3, "width": 4}
    assert summary["labels"] == [1] and summary["box"] is None


# ---------------------------------------------------------------------------------------------
# bundled examples


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_bundled_example_is_its_drawing(example):
    image, masks = render_example(example.name)
    np.testing.assert_array_equal(load_example_image(example.name), image)  # regenerate: python -m linmix.data.examples
    assert example_path(example.name).stat().st_size < 200_000
    height, width = image.shape[:2]
    for prompt in example.prompts:
        target = masks[prompt.target]
        assert target.any()
        for (x, y), label in zip(prompt.points, prompt.labels):
            assert 0 <= x < width and 0 <= y < height
            assert bool(target[int(y), int(x)]) == bool(label), (prompt.name, (x, y))
        if prompt.box is not None:
            ys, xs = np.nonzero(target)
            x0, y0, x1, y1 = prompt.box
            # the box encloses its object with a few pixels of margin
            assert x0 <= xs.min() <= x0 + 8 and y0 <= ys.min() <= y0 + 8
            assert x1 - 8 <= xs.max() <= x1 and y1 - 8 <= ys.max() <= y1


def test_unknown_example():
    with pytest.raises(ValueError, match="unknown example"):
        render_example("nope")


def with_exif_orientation(path, pixels, orientation):
    """Save ``pixels`` (HxWx3 uint8) losslessly (PNG) with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation, to_upright", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_read_image_applies_exif_orientation(tmp_path, orientation, to_upright):
    # Stored 20 high x 40 wide with random pixels: a wrong turn or a flip cannot go unnoticed.
    stored = np.random.default_rng(orientation).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    upright = read_image(with_exif_orientation(tmp_path / "camera.png", stored, orientation))
    # 6: "rotate 90 degrees clockwise to view"; 8: counter-clockwise. Shown (and prompted) 20 wide, 40 high.
    assert upright.shape == (40, 20, 3)
    np.testing.assert_array_equal(upright, to_upright(stored))
    # The stored top-left pixel ends up top-right (6) or bottom-left (8), as a viewer shows it.
    corner = (0, 19) if orientation == 6 else (39, 0)
    np.testing.assert_array_equal(upright[corner], stored[0, 0])

"""mIoU and boundary IoU (HQ-SAM protocol) on hand-computed masks, and erosion against a plain oracle."""

from __future__ import annotations

import numpy as np
import pytest

from linmix.sam.metrics import boundary_dilation, boundary_iou, erode, mask_boundary, mask_iou


def square(size, top, left, height, width):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def reference_erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """HQ-SAM's recipe written out: pad one background pixel, then `iterations` 3x3 erosions in
    which pixels beyond the padded frame do not erode (OpenCV's default border)."""
    padded = np.pad(mask, 1, constant_values=False)
    for _ in range(iterations):
        border = np.pad(padded, 1, constant_values=True)
        out = np.ones_like(padded)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out &= border[1 + dy : 1 + dy + padded.shape[0], 1 + dx : 1 + dx + padded.shape[1]]
        padded = out
    return padded[1:-1, 1:-1]


def test_band_width_follows_the_diagonal():
    assert boundary_dilation(100, 100) == 3  # round(0.02 * 141.4) = round(2.83)
    assert boundary_dilation(10, 10) == 1  # round(0.28) = 0 -> at least 1
    assert boundary_dilation(1000, 750) == 25  # 0.02 * 1250
    assert boundary_dilation(3000, 4000) == 100


def test_mask_iou_by_hand():
    truth = square(10, 2, 2, 5, 5)  # 25 pixels
    shifted = square(10, 2, 3, 5, 5)  # overlap 5 x 4 = 20, union 30
    assert mask_iou(shifted, truth) == pytest.approx(20 / 30)
    assert mask_iou(truth, truth) == 1.0
    assert mask_iou(np.zeros_like(truth), truth) == 0.0
    assert mask_iou(np.zeros_like(truth), np.zeros_like(truth)) == 1.0


def test_boundary_iou_by_hand():
    # 10 x 10 image: d = 1, so each boundary is the 16-pixel ring of its 5 x 5 square.
    truth = square(10, 2, 2, 5, 5)
    shifted = square(10, 2, 3, 5, 5)
    assert int(mask_boundary(truth).sum()) == 16
    # Rings share the top and bottom rows' columns 3..6 (2 x 4 = 8 pixels); union 16 + 16 - 8 = 24.
    assert boundary_iou(shifted, truth) == pytest.approx(8 / 24)
    assert boundary_iou(truth, truth) == 1.0


def test_boundary_counts_the_image_edge_as_background():
    full = np.ones((6, 6), dtype=bool)
    ring = mask_boundary(full, 1).numpy()
    assert ring.sum() == 36 - 16  # the outer ring of the image
    assert not ring[1:5, 1:5].any()
    assert mask_boundary(full, 3).numpy().all()  # d >= half the side: everything is boundary


def test_thin_structure_is_all_boundary():
    wire = np.zeros((100, 100), dtype=bool)
    wire[50:54, 10:90] = True  # 4 px thick < 2 d = 6
    assert np.array_equal(mask_boundary(wire).numpy(), wire)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_erode_matches_iterated_3x3_erosion(iterations):
    rng = np.random.default_rng(iterations)
    mask = rng.random((23, 31)) < 0.8
    mask[5:18, 4:25] = True
    assert np.array_equal(erode(mask, iterations).numpy(), reference_erode(mask, iterations))


def test_bad_inputs():
    with pytest.raises(ValueError, match="same"):
        mask_iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="2-D"):
        boundary_iou(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), bool))

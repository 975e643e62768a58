"""The evaluation-only generator: deterministic, exact and disjoint masks, families of its own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from linmix.sam.data import ProceduralHQDataset
from linmix.sam.data.unseen_shapes import UnseenShapesDataset, from_spec, polygon_signed_distance


def _small(seed: int = 0) -> UnseenShapesDataset:
    return UnseenShapesDataset(seed, 50, min_side=64, max_side=112)


def test_deterministic_per_seed_and_seeds_differ():
    a, b, c = _small(5)[3], _small(5)[3], _small(6)[3]
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_masks_non_empty_inside_the_image_and_disjoint():
    dataset = _small(1)
    for index in range(8):
        sample, kinds = dataset.generate(index)
        height, width = sample.image.shape[:2]
        assert sample.image.dtype == np.uint8 and sample.masks.dtype == bool
        assert sample.masks.shape[1:] == (height, width) and len(kinds) == sample.masks.shape[0] >= 1
        assert all(int(m.sum()) >= 20 for m in sample.masks)
        assert int(sample.masks.sum(0).max()) == 1  # visible masks never overlap


def test_families_differ_from_the_training_generator():
    assert not set(UnseenShapesDataset.KINDS) & set(ProceduralHQDataset.KINDS)
    # Its own random stream: the same (seed, index) gives another image than the training generator.
    assert not np.array_equal(_small(1)[0].image[:8, :8], ProceduralHQDataset(1, 50, min_side=64, max_side=112)[0].image[:8, :8])
    dataset = _small()
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float64) + 0.5
    for kind in UnseenShapesDataset.KINDS:
        for seed in range(3):
            field = getattr(dataset, f"_{kind}")(np.random.default_rng(seed), xx, yy)
            inside = field <= 0
            assert field.shape == (96, 96) and 20 <= int(inside.sum()) < 96 * 96 * 0.8, kind


def test_polygon_signed_distance_values():
    yy, xx = np.mgrid[0:20, 0:20].astype(np.float64) + 0.5
    square = np.array([[5.0, 5.0], [15.0, 5.0], [15.0, 15.0], [5.0, 15.0]])
    field = polygon_signed_distance(xx, yy, square)
    assert field[9, 9] == pytest.approx(-4.5)  # pixel centre (9.5, 9.5): 4.5 from every edge
    assert field[5, 10] == pytest.approx(-0.5) and field[2, 10] == pytest.approx(2.5)
    assert field[0, 0] == pytest.approx(math.hypot(4.5, 4.5))
    assert int((field <= 0).sum()) == 100
    np.testing.assert_allclose(polygon_signed_distance(xx, yy, square[::-1]), field)  # winding does not matter
    # A 5-pointed star's area matches the shoelace formula (pixel-centre sampling on a fine grid).
    fy, fx = np.mgrid[0:400, 0:400].astype(np.float64) + 0.5
    angles = np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 180.0, 80.0)
    star = np.stack([200 + radii * np.cos(angles), 200 + radii * np.sin(angles)], axis=1)
    shoelace = 0.5 * abs(np.dot(star[:, 0], np.roll(star[:, 1], -1)) - np.dot(star[:, 1], np.roll(star[:, 0], -1)))
    assert int((polygon_signed_distance(fx, fy, star) <= 0).sum()) == pytest.approx(shoelace, rel=0.01)


def test_object_pixels_show_the_object_not_the_background():
    sample = _small(2)[0]
    # The anti-aliased image changes across every object's boundary somewhere: masks match the drawing.
    for mask in sample.masks:
        inside = sample.image[mask].astype(np.float64).mean(0)
        ring = np.zeros_like(mask)
        ys, xs = np.nonzero(mask)
        ring[max(0, ys.min() - 3) : ys.max() + 4, max(0, xs.min() - 3) : xs.max() + 4] = True
        outside = sample.image[ring & ~sample.masks.any(0)]
        if len(outside):
            assert np.abs(inside - outside.astype(np.float64).mean(0)).sum() > 10


def test_spec():
    dataset = from_spec("4:12")
    assert (dataset.seed, dataset.length, dataset.name) == (4, 12, "unseen:seed4")
    assert from_spec("4").length == 1000
    for bad in ("", "x", "1:2:3", "1:y"):
        with pytest.raises(ValueError, match="unseen:SEED"):
            from_spec(bad)
    with pytest.raises(ValueError, match="min_side"):
        UnseenShapesDataset(0, 10, min_side=32)
    with pytest.raises(IndexError):
        _small()[50]


def test_load_dataset_builds_the_unseen_kind():
    from linmix.sam.data import load_dataset

    dataset = load_dataset("unseen:4:6")
    assert isinstance(dataset, UnseenShapesDataset) and (dataset.seed, len(dataset)) == (4, 6) and dataset.is_generated
    direct = from_spec("4:6")
    np.testing.assert_array_equal(dataset[2].image, direct[2].image)
    np.testing.assert_array_equal(dataset[2].masks, direct[2].masks)
    with pytest.raises(ValueError, match="unseen:SEED"):
        load_dataset("unseen:x")

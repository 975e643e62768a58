"""benchmarks/sam_photos_figure.py on a tiny random model and tiny generated photographs and cut-outs:
the PNG is written, the rows hold held-out items only, and the IoU column is recomputed from the masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import load_benchmark
from linmix.sam.data.copypaste import source_key, split_of
from tiny_sam import save_tiny_sam


def _disc(colour, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.where(np.hypot(xx - size / 2, yy - size / 2) <= size * 0.45, 255, 0)
    return rgba


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        pixels = rng.uniform(0, 255, size=(60 + 4 * i, 80, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"photo{i}.{'jpg' if i % 2 else 'png'}")
    objects = root / "cutouts"
    objects.mkdir()
    for i in range(8):
        Image.fromarray(_disc((30 * i, 255 - 30 * i, 100), 40), "RGBA").save(objects / f"thing{i}.png")
    checkpoint = root / "tiny.safetensors"
    save_tiny_sam(checkpoint, seed=3)
    return {"photos": photos, "objects": objects, "checkpoint": checkpoint}


def test_figure_is_written_and_the_table_matches_the_masks(tmp_path, sources, capsys):
    figure = load_benchmark("sam_photos_figure")
    out = tmp_path / "figure.png"
    rows = figure.main([
        "--checkpoint", str(sources["checkpoint"]), "--out", str(out), "--images", "2", "--points-per-side", "4",
        "--size", "64-96", "--backgrounds", str(sources["photos"]), "--objects", str(sources["objects"]),
        "--emoji", "none", "--heldout-every", "2",
    ])
    with Image.open(out) as png:
        assert png.mode == "P" and png.size[0] > 300  # palette PNG
    assert len(rows) == 3  # two pasted images and the natural photograph

    keys = {source_key(path, sources["photos"]) for path in sources["photos"].iterdir()}
    heldout = {key for key in keys if split_of(key, 2) == "heldout"}
    for row in rows[:2]:
        assert row.name.startswith("copypaste-heldout-1-")
        for mask, truth, iou in ((row.box_mask, row.box_truth, row.box_iou), (row.point_mask, row.point_truth, row.point_iou)):
            assert mask.shape == truth.shape == row.image.shape[:2] and truth.any()
            union = np.logical_or(mask, truth).sum()
            expected = np.logical_and(mask, truth).sum() / union if union else 1.0
            assert 0.0 <= iou <= 1.0 and iou == pytest.approx(expected)
        # The box is the box truth's tight box; the point lies inside the point truth.
        ys, xs = np.nonzero(row.box_truth)
        assert row.box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert row.point_truth[int(row.point[1]), int(row.point[0])]
        assert row.auto_count >= 0 and row.auto_masks.shape[1:] == row.image.shape[:2]

    natural = rows[-1]
    assert natural.box_truth is None and natural.box_iou is None and natural.point_iou is None
    assert natural.name.endswith(".jpg (nothing pasted)") and natural.name.split(".")[0] in heldout
    height, width = natural.image.shape[:2]
    assert natural.box.tolist() == pytest.approx([0.25 * width, 0.25 * height, 0.75 * width, 0.75 * height])
    assert natural.auto_count >= 0

    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and "image" not in line]
    assert len(lines) == 3
    for row, line in zip(rows, lines):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row.name and int(cells[4]) == row.auto_count
        for cell, iou in zip(cells[2:4], (row.box_iou, row.point_iou)):
            assert cell == ("-" if iou is None else f"{iou:.3f}")


def test_interior_point_is_deep_inside():
    figure = load_benchmark("sam_photos_figure")
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:25, 2:12] = True  # a 10-wide bar ...
    mask[12:18, 12:38] = True  # ... and a thinner arm: the deepest pixels are in the bar
    x, y = figure.interior_point(mask)
    assert 5 <= x <= 8 and 12 <= y <= 17
    with pytest.raises(ValueError, match="empty mask"):
        figure.interior_point(np.zeros((4, 4), dtype=bool))
    assert figure.mask_iou(mask, mask) == 1.0 and figure.mask_iou(mask, ~mask) == 0.0

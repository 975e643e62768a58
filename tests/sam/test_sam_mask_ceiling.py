"""benchmarks/sam_mask_ceiling.py: the fitted low-resolution logits reproduce a mask as well as the
input size allows (a large frame nearly exactly, a tiny one less well), and the script prints its table."""

from __future__ import annotations

import numpy as np

from helpers import load_benchmark
from linmix.sam.data import SegmentationSample


def test_ceiling_is_near_perfect_for_a_large_blob_and_lower_for_a_thin_line():
    ceiling = load_benchmark("sam_mask_ceiling")
    ys, xs = np.mgrid[:128, :160]
    blob = ((ys - 64) ** 2 + (xs - 80) ** 2) < 40**2
    line = np.zeros((128, 160), dtype=bool)
    line[60:62, 10:150] = True  # 2 px wide: below a 64 px model's 4-pixel logit cells
    image = np.zeros((128, 160, 3), np.uint8)
    blob_only = SegmentationSample(image=image, masks=blob[None], name="blob")
    line_only = SegmentationSample(image=image, masks=line[None], name="line")
    assert ceiling.fitted_ceiling(blob_only, 160, iterations=60)[0] > 0.97
    assert ceiling.fitted_ceiling(line_only, 64, iterations=60)[0] < ceiling.fitted_ceiling(line_only, 160, iterations=60)[0]


def test_script_prints_a_row_per_size(capsys):
    ceiling = load_benchmark("sam_mask_ceiling")
    assert ceiling.main(["--sizes", "64", "128", "--images", "2", "--stride", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| 64 px") or line.startswith("| 128 px")]
    assert len(rows) == 2
    assert all(0.0 <= float(cell) <= 1.0 for row in rows for cell in row.strip("|").split("|")[1:])

"""linmix.sam.mask_utils: RLE and COCO's compressed RLE against pycocotools (the format's reference
library) on random and edge-case masks, with and without pycocotools in the loop; the automatic mask
generator still exports the moved names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import linmix.sam.automatic_mask_generator as generator_module
from linmix.sam import mask_utils
from linmix.sam.mask_utils import (
    _counts_to_coco_rle_string_python,
    area_from_rle,
    coco_rle_string_to_counts,
    counts_to_coco_rle_string,
    mask_to_coco_rle,
    mask_to_rle,
    rle_to_mask,
)

coco_mask = pytest.importorskip("pycocotools.mask")
# pycocotools' decode passes copy=False to numpy 2 (its own deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def edge_and_random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((5, 7), bool),  # empty
        np.ones((5, 7), bool),  # full
        np.ones((1, 1), bool),
        np.zeros((1, 1), bool),
        rng.random((1, 37)) < 0.5,  # 1 x N
        rng.random((29, 1)) < 0.5,  # N x 1
        np.indices((9, 11)).sum(0) % 2 == 0,  # checkerboard: a run per pixel
        np.zeros((0, 4), bool),  # no pixels at all
        np.zeros((3, 0), bool),
    ]
    first_only = np.zeros((6, 5), bool)
    first_only[0, 0] = True
    last_only = np.zeros((6, 5), bool)
    last_only[-1, -1] = True
    masks += [first_only, last_only]
    for height, width, density in [(13, 17, 0.5), (31, 7, 0.05), (7, 31, 0.95), (64, 48, 0.3), (101, 99, 0.001)]:
        masks.append(rng.random((height, width)) < density)
    # Long runs: counts above 2**5, 2**10 and 2**15 need several 5-bit groups, with large differences
    # between a count and the one two before it (both signs).
    yy, xx = np.mgrid[:300, :250]
    masks.append((yy - 150) ** 2 + (xx - 120) ** 2 < 90**2)
    big = np.zeros((400, 300), bool)
    big[:, :100] = True
    big[390:, 200:] = True
    masks.append(big)
    return masks


MASKS = edge_and_random_masks()
IDS = [f"{m.shape[0]}x{m.shape[1]}-{i}" for i, m in enumerate(MASKS)]


def reference_rle(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.mark.parametrize("mask", MASKS, ids=IDS)
def test_coco_strings_decoding_and_areas_equal_pycocotools(mask):
    reference = reference_rle(mask)
    reference_string = reference["counts"].decode("ascii")
    counts = mask_to_rle(mask)[0]["counts"]
    assert mask_to_rle(mask)[0]["size"] == list(reference["size"])
    # Our pure-Python encoder (the fallback) and the dispatching one give pycocotools' string.
    assert _counts_to_coco_rle_string_python(counts) == reference_string
    assert counts_to_coco_rle_string(counts) == reference_string
    assert mask_to_coco_rle(mask) == [{"size": list(reference["size"]), "counts": reference_string}]
    # Decoding pycocotools' string (as bytes and as text) gives its mask and our counts back.
    assert coco_rle_string_to_counts(reference["counts"]) == counts
    for rle in (reference, {"size": reference["size"], "counts": reference_string}, {"size": list(mask.shape), "counts": counts}):
        decoded = rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded, coco_mask.decode(reference).astype(bool))
        np.testing.assert_array_equal(decoded, mask)
    assert area_from_rle(reference) == area_from_rle({"size": list(mask.shape), "counts": counts}) == int(coco_mask.area(reference))
    # pycocotools turns our uncompressed RLE into the same compressed one.
    height, width = mask.shape
    assert coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"].decode() == reference_string


def test_batches_and_tensors_equal_pycocotools():
    rng = np.random.default_rng(1)
    batch = rng.random((6, 23, 19)) < 0.4
    batch[0] = False
    batch[1] = True
    reference = coco_mask.encode(np.asfortranarray(batch.transpose(1, 2, 0).astype(np.uint8)))
    expected = [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in reference]
    assert mask_to_coco_rle(torch.from_numpy(batch)) == expected
    assert [counts_to_coco_rle_string(r["counts"]) for r in mask_to_rle(torch.from_numpy(batch))] == [e["counts"] for e in expected]
    assert mask_to_coco_rle(np.zeros((0, 4, 5), bool)) == []


def test_without_pycocotools_the_pure_python_encoder_gives_the_same_strings(monkeypatch):
    rng = np.random.default_rng(2)
    batch = rng.random((4, 17, 21)) < 0.3
    with_reference = mask_to_coco_rle(batch)
    counts = [r["counts"] for r in mask_to_rle(batch)]
    strings = [counts_to_coco_rle_string(c) for c in counts]
    monkeypatch.setattr(mask_utils, "_pycocotools_mask", lambda: None)
    assert mask_to_coco_rle(batch) == with_reference
    assert [counts_to_coco_rle_string(c) for c in counts] == strings


def test_bad_rles_raise_clear_errors():
    with pytest.raises(ValueError, match="sum to 5, expected H \\* W = 6"):
        rle_to_mask({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match=">= 0"):
        rle_to_mask({"size": [2, 3], "counts": [8, -2]})
    with pytest.raises(ValueError, match="ends inside a count"):
        coco_rle_string_to_counts("0" + chr(48 + 0x20))  # a continuation bit with nothing after it
    with pytest.raises(ValueError, match="\\[B, H, W\\]"):
        mask_to_coco_rle(np.zeros((1, 2, 3, 4), bool))


def test_the_generator_still_exports_the_moved_names():
    for name in ("mask_to_rle", "rle_to_mask", "area_from_rle", "counts_to_coco_rle_string", "coco_rle_string_to_counts",
                 "batched_mask_to_box", "batched_nms", "box_iou", "build_point_grid", "build_all_layer_point_grids",
                 "calculate_stability_score", "generate_crop_boxes", "label_connected_components", "remove_small_regions"):
        assert getattr(generator_module, name) is getattr(mask_utils, name), name
        assert name in generator_module.__all__

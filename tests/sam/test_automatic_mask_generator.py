"""AutomaticMaskGenerator: helpers on hand examples, the algorithm with a cheap stand-in predictor, and
one end-to-end run of the real tiny model (one image encoding, one batch of 4 prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linmix.sam.automatic_mask_generator import (
    AutomaticMaskGenerator,
    area_from_rle,
    batched_mask_to_box,
    batched_nms,
    build_point_grid,
    calculate_stability_score,
    coco_rle_string_to_counts,
    counts_to_coco_rle_string,
    generate_crop_boxes,
    label_connected_components,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
)
from linmix.sam.model import build_rwkv_sam
from linmix.sam.predictor import RwkvSamPredictor

RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_rwkv_sam("tiny")


# ---------------------------------------------------------------------------------------------
# RLE


def test_rle_column_major_by_hand():
    # 2 rows x 3 columns; column-major order reads (0,0) (1,0) (0,1) (1,1) (0,2) (1,2) = 0 1 1 1 0 0.
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    (rle,) = mask_to_rle(torch.from_numpy(mask))
    assert rle == {"size": [2, 3], "counts": [1, 3, 2]}
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    assert area_from_rle(rle) == 3
    # A first pixel set starts with a zero-length run of zeros.
    first = np.array([[1, 0, 0], [0, 0, 1]], dtype=bool)
    assert mask_to_rle(first)[0]["counts"] == [0, 1, 4, 1]
    assert mask_to_rle(np.zeros((2, 3), bool))[0]["counts"] == [6]
    assert mask_to_rle(np.ones((2, 3), bool))[0]["counts"] == [0, 6]


def test_rle_round_trip_and_coco_strings():
    rng = np.random.default_rng(1)
    masks = rng.random((5, 13, 17)) > 0.6
    masks[1] = False
    masks[2] = True
    masks[3, 2:9, 3:15] = True  # long runs: counts >= 16 need several 5-bit groups
    rles = mask_to_rle(torch.from_numpy(masks))
    for mask, rle in zip(masks, rles):
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        assert area_from_rle(rle) == mask.sum()
        text = counts_to_coco_rle_string(rle["counts"])
        assert isinstance(text, str)
        assert coco_rle_string_to_counts(text) == rle["counts"]
        np.testing.assert_array_equal(rle_to_mask({"size": rle["size"], "counts": text}), mask)
    # By hand (5-bit groups, low first, + 48; bit 0x20 = more groups follow; bit 0x10 of the last group
    # is the sign): 1 -> "1", 10 -> ":", 33 = 1 + 1 * 32 -> "Q1", 16 -> "`0" (a second group keeps it positive).
    assert counts_to_coco_rle_string([1, 10]) == "1:"
    assert counts_to_coco_rle_string([33]) == "Q1"
    assert counts_to_coco_rle_string([16]) == "`0"
    # 4th count coded as 2 - 10 = -8: 0b11000 -> 24 + 48 = "H".
    assert counts_to_coco_rle_string([3, 10, 4, 2]) == "3:4H"
    # From the 4th count on, the difference to the count two before is coded (negative too).
    assert coco_rle_string_to_counts(counts_to_coco_rle_string([5, 3, 7, 2, 40, 1])) == [5, 3, 7, 2, 40, 1]


# ---------------------------------------------------------------------------------------------
# boxes, stability, NMS


def test_batched_mask_to_box_by_hand():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 4, 0] = True  # one pixel
    boxes = batched_mask_to_box(masks)
    assert boxes.tolist() == [[2, 1, 4, 2], [0, 4, 0, 4], [0, 0, 0, 0]]
    assert batched_mask_to_box(masks.reshape(1, 3, 5, 6)).shape == (1, 3, 4)
    assert batched_mask_to_box(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)


def test_stability_score_by_hand():
    logits = torch.tensor([[[-2.0, -0.5, 0.5, 1.5], [2.0, 3.0, -3.0, 0.9]]])
    # > +1: 1.5, 2.0, 3.0 -> 3 pixels; > -1: all but -2 and -3 -> 6 pixels.
    torch.testing.assert_close(calculate_stability_score(logits, 0.0, 1.0), torch.tensor([0.5]))
    # > 1.5: 2.0, 3.0 -> 2; > -0.5 (strictly): 0.5, 1.5, 2.0, 3.0, 0.9 -> 5.
    torch.testing.assert_close(calculate_stability_score(logits, 0.5, 1.0), torch.tensor([0.4]))
    assert calculate_stability_score(torch.full((2, 3, 3), -9.0), 0.0, 1.0).tolist() == [0.0, 0.0]


def test_batched_nms_by_hand():
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],  # 0
            [1, 0, 11, 10],  # 1: IoU with 0 = 90 / 110 = 0.82
            [0, 0, 10, 5],  # 2: IoU with 0 = 0.5
            [20, 20, 30, 30],  # 3: disjoint
        ],
        dtype=torch.float,
    )
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    zeros = torch.zeros(4, dtype=torch.long)
    # Box 1 (best) suppresses 0 (0.82 > 0.7); 2 overlaps 1 by 45 / 105 < 0.7 and stays.
    assert batched_nms(boxes, scores, zeros, 0.7).tolist() == [1, 2, 3]
    assert batched_nms(boxes, scores, zeros, 0.4).tolist() == [1, 3]
    assert batched_nms(boxes, scores, zeros, 0.95).tolist() == [1, 2, 0, 3]
    # Different categories never suppress each other.
    assert batched_nms(boxes, scores, zeros, 0.6).tolist() == [1, 2, 3]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0]), 0.6).tolist() == [1, 2, 0, 3]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


# ---------------------------------------------------------------------------------------------
# grids, crops, connected components


def test_point_grid_and_crop_boxes():
    np.testing.assert_allclose(build_point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    boxes, layers = generate_crop_boxes((100, 200), 1, 0.5)
    assert layers == [0, 1, 1, 1, 1]
    # overlap = int(0.5 * 100 * 2 / 2) = 50; crop_w = ceil((50 + 200) / 2) = 125; crop_h = 75.
    assert boxes == [[0, 0, 200, 100], [0, 0, 125, 75], [0, 25, 125, 100], [75, 0, 200, 75], [75, 25, 200, 100]]


def test_connected_components_and_small_regions():
    mask = np.array(
        [
            [1, 1, 0, 0, 0, 1],
            [0, 1, 0, 0, 1, 0],  # (1, 4) touches (0, 5) diagonally: 8-connected
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 0, 1],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=bool,
    )
    labels, sizes = label_connected_components(mask)
    assert sizes.tolist() == [3, 2, 1, 8]
    assert labels[0, 0] == labels[1, 1] == 1 and labels[0, 5] == labels[1, 4] == 2
    assert labels[3, 0] == 3 and labels[5, 3] == 4 and (labels[~mask] == 0).all()
    # A U shape whose arms merge only at the bottom is one component.
    u = np.zeros((4, 5), bool)
    u[:, 0] = u[:, 4] = u[3, :] = True
    assert label_connected_components(u)[1].tolist() == [11]
    assert label_connected_components(np.zeros((3, 3), bool))[1].size == 0

    islands, changed = remove_small_regions(mask, 3, "islands")
    assert changed and islands.sum() == 11 and not islands[3, 0] and not islands[0, 5]
    filled, changed = remove_small_regions(mask, 2, "holes")
    assert changed and filled[4, 4] and filled.sum() == mask.sum() + 1
    same, changed = remove_small_regions(mask, 1, "islands")
    assert not changed and (same == mask).all()
    # Every island small: the largest is kept.
    only, _ = remove_small_regions(mask, 100, "islands")
    assert only.sum() == 8


# ---------------------------------------------------------------------------------------------
# the algorithm with a stand-in predictor (no encoder): each point prompt gives three disks


class DiskPredictor(RwkvSamPredictor):
    """Logits ``radius - distance`` to the prompt point, radii 3 / 6 / 40 pixels, IoU 0.9 / 0.8 / 0.7."""

    radii = (3.0, 6.0, 40.0)

    def __init__(self, model):
        super().__init__(model)
        self.images = []

    def set_image(self, image, image_format="RGB"):
        self.images.append(image.shape)
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(*image.shape[:2], self.transform.target_length)
        self.is_image_set = True
        self.features = object()

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True, return_logits=False):
        h, w = self.original_size
        scale = torch.tensor([w / self.input_size[1], h / self.input_size[0]])
        points = point_coords[:, 0, :] * scale  # back to image pixels
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        dist = ((xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2).sqrt()
        logits = torch.stack([r - dist for r in self.radii], dim=1)
        iou = torch.tensor([0.9, 0.8, 0.7]).expand(len(points), 3)
        masks = logits if return_logits else logits > 0
        return masks, iou, torch.zeros(len(points), 3, 256, 256)


def disk_generator(model, **kwargs):
    generator = AutomaticMaskGenerator(model, **kwargs)
    generator.predictor = DiskPredictor(model)
    return generator


def check_record(record, height, width, output_mode):
    assert set(record) == RECORD_KEYS
    seg = record["segmentation"]
    if output_mode == "binary_mask":
        assert isinstance(seg, np.ndarray) and seg.dtype == bool and seg.shape == (height, width)
        mask = seg
    else:
        assert seg["size"] == [height, width]
        assert isinstance(seg["counts"], str if output_mode == "coco_rle" else list)
        mask = rle_to_mask(seg)
    assert isinstance(record["area"], int) and record["area"] == mask.sum()
    assert len(record["bbox"]) == 4 and all(isinstance(v, (int, float)) for v in record["bbox"])
    if mask.any():
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    assert isinstance(record["predicted_iou"], float) and isinstance(record["stability_score"], float)
    assert len(record["point_coords"]) == 1 and len(record["point_coords"][0]) == 2
    x, y = record["point_coords"][0]
    assert 0 <= x <= width and 0 <= y <= height
    cx, cy, cw, ch = record["crop_box"]
    assert 0 <= cx and 0 <= cy and cx + cw <= width and cy + ch <= height
    return mask


def test_generate_disks_filters_and_nms(model):
    height, width = 60, 80
    image = np.zeros((height, width, 3), np.uint8)
    generator = disk_generator(model, points_per_side=2, pred_iou_thresh=0.75, stability_score_thresh=0.0)
    records = generator.generate(image)
    # The 0.7-IoU 40-pixel disks are filtered; the 3- and 6-pixel disks of the 4 points overlap < 0.7.
    assert len(records) == 8 and generator.predictor.images == [(height, width, 3)]
    points = {tuple(r["point_coords"][0]) for r in records}
    assert points == {(20.0, 15.0), (60.0, 15.0), (20.0, 45.0), (60.0, 45.0)}
    for record in records:
        mask = check_record(record, height, width, "binary_mask")
        assert record["crop_box"] == [0, 0, width, height]
        x, y = record["point_coords"][0]
        assert mask[int(y), int(x)]
    # Stability: disk logits r - d are > +1 on radius r - 1 and > -1 on radius r + 1.
    strict = disk_generator(model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.6)
    kept = strict.generate(image)
    assert kept and all(r["stability_score"] >= 0.6 for r in kept)
    assert min(r["area"] for r in kept) > 30  # the 3-pixel disks ((2/4)^2 ~ 0.25) are not stable
    # Box NMS: with threshold 0 only non-overlapping boxes survive per crop.
    lone = disk_generator(model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.0)
    assert len(lone.generate(image)) == 4


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_generate_with_crops(model, output_mode):
    height, width = 90, 120
    image = np.zeros((height, width, 3), np.uint8)
    generator = disk_generator(
        model, points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        crop_n_layers=1, crop_n_points_downscale_factor=2, output_mode=output_mode,
    )
    records = generator.generate(image)
    shapes = generator.predictor.images
    assert len(shapes) == 5 and shapes[0] == (height, width, 3)
    crops = {tuple(r["crop_box"]) for r in records}
    assert (0, 0, width, height) in crops and len(crops) > 1  # masks from the crops survive too
    for record in records:
        check_record(record, height, width, output_mode)


def test_min_mask_region_area(model):
    class RingPredictor(DiskPredictor):
        def predict_torch(self, point_coords, point_labels, **kwargs):
            masks, iou, low = super().predict_torch(point_coords, point_labels, **kwargs)
            masks = masks.clone()
            masks[:, 2, 0, 0] = 5.0  # a 1-pixel island on the big disk
            return masks, iou, low

    generator = AutomaticMaskGenerator(model, points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=4)
    generator.predictor = RingPredictor(model)
    records = generator.generate(np.zeros((100, 100, 3), np.uint8))
    big = max(records, key=lambda r: r["area"])
    assert not big["segmentation"][0, 0] and big["area"] > 1000


def test_invalid_arguments(model):
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(model, output_mode="png")
    with pytest.raises(ValueError, match="one grid per layer"):
        AutomaticMaskGenerator(model, points_per_side=None, point_grids=[build_point_grid(2)], crop_n_layers=1)
    with pytest.raises(ValueError, match="uint8"):
        AutomaticMaskGenerator(model).generate(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# end to end with the real tiny model (random weights): one encoding, one batch of 4 prompts


def test_generate_end_to_end_tiny_model(model):
    height, width = 40, 56
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    generator = AutomaticMaskGenerator(
        model, points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        box_nms_thresh=1.0, output_mode="binary_mask",
    )
    records = generator.generate(image)
    assert 1 <= len(records) <= 12  # 4 points x 3 masks, less empty duplicates
    for record in records:
        check_record(record, height, width, "binary_mask")
    assert not generator.predictor.is_image_set

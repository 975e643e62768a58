"""Automatic-mask thresholds stored with the weights: the sidecar, the calibration rule, the CLI
wiring, and (slow) the shipped model finding the bundled examples' objects with its stored thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import linmix.segment
from linmix.cli import main
from linmix.sam.auto_calibration import CandidateScores, candidate_scores, choose_thresholds, generator_outcome
from linmix.sam.auto_defaults import (
    SAM_AUTOMATIC_MASK_DEFAULTS,
    automatic_mask_defaults_for,
    automatic_mask_sidecar_path,
    read_automatic_mask_defaults,
    write_automatic_mask_defaults,
)
from linmix.sam.model import default_checkpoint_path

SHIPPED = default_checkpoint_path()


def test_sidecar_round_trip_and_sam_defaults_without_one(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    assert automatic_mask_sidecar_path(checkpoint) == tmp_path / "model.auto_masks.json"
    assert read_automatic_mask_defaults(checkpoint) == SAM_AUTOMATIC_MASK_DEFAULTS  # a SAM checkpoint keeps SAM's
    assert read_automatic_mask_defaults(None) == SAM_AUTOMATIC_MASK_DEFAULTS
    path = write_automatic_mask_defaults(checkpoint, {"pred_iou_thresh": 0.61234, "stability_score_thresh": 0.8}, {"images": 3})
    record = json.loads(path.read_text())
    assert record == {"pred_iou_thresh": 0.6123, "stability_score_thresh": 0.8, "measured": {"images": 3}}
    assert read_automatic_mask_defaults(checkpoint) == {"pred_iou_thresh": 0.6123, "stability_score_thresh": 0.8}


@pytest.mark.parametrize(
    "text, message",
    [("{", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"pred_iou_thresh": 0.5}', "stability_score_thresh must be a number"),
     ('{"pred_iou_thresh": 1.5, "stability_score_thresh": 0.9}', "pred_iou_thresh must be a number in")],
)
def test_bad_sidecar_is_a_clear_error(tmp_path, text, message):
    checkpoint = tmp_path / "model.safetensors"
    automatic_mask_sidecar_path(checkpoint).write_text(text)
    with pytest.raises(ValueError, match=f"model.auto_masks.json.*{message}|{message}"):
        read_automatic_mask_defaults(checkpoint)


def test_attached_defaults_win_over_the_checkpoint_file(tmp_path):
    class Model:
        automatic_mask_defaults = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.7}

    assert automatic_mask_defaults_for(Model(), tmp_path / "x.safetensors") == {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.7}
    assert automatic_mask_defaults_for(object(), None) == SAM_AUTOMATIC_MASK_DEFAULTS


def _scores(predicted, stability, boxes, truth_iou) -> CandidateScores:
    return CandidateScores(predicted, stability, boxes, truth_iou)


def test_choose_thresholds_keeps_good_masks_and_drops_bad_ones():
    # Image with 2 objects, far apart boxes. Object 0: a good candidate at predicted IoU 0.7 /
    # stability 0.9; object 1: a good one at 0.6 / 0.85. Bad candidates: 0.5 / 0.95 (stable, wrong),
    # 0.75 / 0.6 (unstable) and 0.3 / 0.99, each with its own box.
    image = _scores(
        predicted=[0.7, 0.6, 0.5, 0.75, 0.3],
        stability=[0.9, 0.85, 0.95, 0.6, 0.99],
        boxes=[[0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 110, 10], [0, 100, 10, 110], [100, 100, 110, 110]],
        truth_iou=[[0.9, 0.0], [0.0, 0.8], [0.3, 0.0], [0.0, 0.2], [0.1, 0.0]],
    )
    chosen = choose_thresholds([image], good_iou=0.75)
    assert chosen["recall"] == 1.0 and chosen["precision"] == 1.0 and chosen["masks"] == 2 and chosen["f1"] == 1.0
    assert 0.5 <= chosen["pred_iou_thresh"] < 0.6 and 0.6 < chosen["stability_score_thresh"] <= 0.85
    sam = generator_outcome([image], 0.88, 0.95)
    assert sam["masks"] == 0 and sam["recall"] == 0.0  # SAM's thresholds return nothing here
    everything = generator_outcome([image], 0.0, 0.0)
    assert everything["masks"] == 5 and everything["precision"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        choose_thresholds([_scores([0.5], [0.9], [[0, 0, 4, 4]], [[0.1]])])


def test_nms_in_the_replay_suppresses_the_lower_scored_duplicate():
    # Two candidates with the same box: NMS keeps the one with the higher predicted IoU, even when
    # it is the worse mask (the generator's behaviour).
    image = _scores([0.9, 0.8], [0.99, 0.99], [[0, 0, 10, 10], [0, 0, 10, 10]], [[0.3], [0.95]])
    assert image.kept(0.0, 0.0).tolist() == [0]
    assert generator_outcome([image], 0.0, 0.0)["recall"] == 0.0
    assert generator_outcome([image], 0.85, 0.0)["recall"] == 0.0  # filter first, then NMS
    assert image.kept(0.0, 0.0, box_nms_thresh=1.0).tolist() == [0, 1]


def test_replay_matches_the_automatic_mask_generator():
    from tiny_sam import tiny_sam

    from linmix.sam import AutomaticMaskGenerator

    model = tiny_sam(0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    truth = np.zeros((40, 56), dtype=bool)
    truth[5:30, 10:40] = True
    scores = candidate_scores(model, image, [truth], points_per_side=3, points_per_batch=4)
    assert scores.predicted_iou.shape == (27,) and scores.truth_iou.shape == (27, 1)
    for p, s in ((0.0, 0.0), (float(np.median(scores.predicted_iou)), 0.0), (0.0, float(np.median(scores.stability)))):
        records = AutomaticMaskGenerator(model, points_per_side=3, points_per_batch=4, pred_iou_thresh=p, stability_score_thresh=s).generate(image)
        kept = scores.kept(p, s)
        assert len(records) == len(kept) >= 1
        np.testing.assert_allclose(sorted(r["predicted_iou"] for r in records), sorted(scores.predicted_iou[kept]), rtol=1e-5)
        np.testing.assert_allclose(sorted(r["stability_score"] for r in records), sorted(scores.stability[kept]), rtol=1e-5)
        ious = sorted(float((r["segmentation"] & truth).sum() / max((r["segmentation"] | truth).sum(), 1)) for r in records)
        np.testing.assert_allclose(ious, sorted(scores.truth_iou[kept, 0]), rtol=1e-5)


def test_cli_auto_uses_the_stored_thresholds_unless_given(tmp_path, monkeypatch, capsys):
    from tiny_sam import save_tiny_sam

    checkpoint = tmp_path / "tiny.safetensors"
    save_tiny_sam(checkpoint)
    write_automatic_mask_defaults(checkpoint, {"pred_iou_thresh": 0.42, "stability_score_thresh": 0.77})
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(image)
    seen = []

    def fake_automatic_masks(model, pixels, **options):
        seen.append(options)
        return []

    monkeypatch.setattr(linmix.segment, "automatic_masks", fake_automatic_masks)
    assert main(["sam", "auto", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert (seen[-1]["pred_iou_thresh"], seen[-1]["stability_score_thresh"]) == (0.42, 0.77)
    assert main(["sam", "auto", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--pred-iou-thresh", "0.9", "--stability-thresh", "0.5"]) == 0
    assert (seen[-1]["pred_iou_thresh"], seen[-1]["stability_score_thresh"]) == (0.9, 0.5)
    automatic_mask_sidecar_path(checkpoint).unlink()  # no sidecar: SAM's thresholds
    assert main(["sam", "auto", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert (seen[-1]["pred_iou_thresh"], seen[-1]["stability_score_thresh"]) == (0.88, 0.95)
    capsys.readouterr()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped weights are absent")
def test_shipped_weights_carry_calibrated_thresholds():
    from linmix.sam import load_default

    stored = read_automatic_mask_defaults(SHIPPED)
    assert automatic_mask_sidecar_path(SHIPPED).is_file()
    assert stored["pred_iou_thresh"] < SAM_AUTOMATIC_MASK_DEFAULTS["pred_iou_thresh"]
    assert load_default().automatic_mask_defaults == stored


# Measured with the stored thresholds (0.72 / 0.86) and 16 x 16 points (the `sam auto` default):
# each object's best IoU over the returned masks was ellipse 0.957, square 0.972, triangle 0.894;
# wire 0.939; card 0.562, disc 0.827. Not found at these thresholds (the shipped model's limits,
# listed so the test says so): the ring with its hole (best 0.225), the small disc beside the wire
# (0.0) and the star (0.006).
EXAMPLE_OBJECT_IOU_BOUND = {
    "shapes": {"ellipse": 0.9, "square": 0.9, "triangle": 0.85},
    "ring_and_wire": {"wire": 0.9},
    "overlap": {"card": 0.5, "disc": 0.78},
}


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped weights are absent")
def test_bundled_examples_give_their_objects_with_the_stored_thresholds():
    from linmix.data.examples import EXAMPLES, load_example_image, render_example
    from linmix.sam import AutomaticMaskGenerator, load_default

    model = load_default()
    for example in EXAMPLES:
        truths = render_example(example.name)[1]
        records = AutomaticMaskGenerator(model, points_per_side=16, **model.automatic_mask_defaults).generate(load_example_image(example.name))
        assert 1 <= len(records) <= 10, (example.name, len(records))  # a few masks, not SAM's zero nor a flood
        for name, bound in EXAMPLE_OBJECT_IOU_BOUND[example.name].items():
            truth = truths[name]
            best = max(float((r["segmentation"] & truth).sum() / (r["segmentation"] | truth).sum()) for r in records)
            assert best >= bound, (example.name, name, best)


def test_calibration_scores_round_trip_through_npz_without_pickle(tmp_path):
    from helpers import load_benchmark

    calibration = load_benchmark("sam_auto_calibration")
    rng = np.random.default_rng(0)
    images = [
        CandidateScores(rng.random(n), rng.random(n), rng.random((n, 4)) * 100, rng.random((n, k)))
        for n, k in ((5, 2), (3, 1), (1, 3))
    ]
    path = tmp_path / "scores.npz"
    calibration.save_candidate_scores(str(path), ["a", "procedural-1", "c"], images)
    names, loaded = calibration.load_candidate_scores(str(path))
    assert names == ["a", "procedural-1", "c"]
    for before, after in zip(images, loaded):
        for column in ("predicted_iou", "stability", "boxes", "truth_iou"):
            np.testing.assert_array_equal(getattr(after, column), getattr(before, column))

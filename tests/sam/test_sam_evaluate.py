"""`linmix sam eval`: deterministic point prompts, per-image averaging and the table, against the
metrics recomputed by hand from the predictor's own masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linmix.cli import main
from linmix.sam.data import ProceduralHQDataset, SegmentationSample
from linmix.sam.evaluate import evaluate_model, innermost_pixel, point_prompt_from_mask, results_to_markdown
from linmix.sam.metrics import boundary_iou, mask_iou
from linmix.sam.model import build_rwkv_sam, save_rwkv_sam
from linmix.sam.predictor import RwkvSamPredictor


def test_innermost_pixel_of_a_rectangle_and_an_l_shape():
    mask = np.zeros((20, 30), bool)
    mask[4:15, 5:26] = True  # 11 rows x 21 columns: depth 5, the deepest pixels are the centre row
    assert innermost_pixel(mask) == (15, 9)
    ell = np.zeros((20, 20), bool)
    ell[2:18, 2:6] = True
    ell[14:18, 2:18] = True
    x, y = innermost_pixel(ell)
    assert ell[y, x]
    with pytest.raises(ValueError, match="empty"):
        innermost_pixel(np.zeros((3, 3), bool))


def test_point_prompts_are_deterministic_and_inside():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 10:30] = True
    a = point_prompt_from_mask(mask, 3, np.random.default_rng(1))
    b = point_prompt_from_mask(mask, 3, np.random.default_rng(1))
    assert np.array_equal(a[0], b[0]) and a[1].tolist() == [1, 1, 1]
    xs, ys = a[0][:, 0].astype(int), a[0][:, 1].astype(int)
    assert mask[ys, xs].all()


def test_evaluate_model_matches_hand_recomputation():
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny", image_size=64)
    dataset = ProceduralHQDataset(seed=11, length=2, min_side=64, max_side=96)
    result = evaluate_model(model, dataset, prompt_kinds=("box", "point"), points=2)
    assert result["images"] == 2 and result["objects"] == sum(len(dataset[i].masks) for i in range(2))

    predictor = RwkvSamPredictor(model)
    per_image = {"box": [], "point": []}
    for index in range(2):
        sample = dataset[index]
        predictor.set_image(sample.image)
        rng = np.random.default_rng([0, index])
        box_scores, point_scores = [], []
        for truth in sample.masks:
            ys, xs = np.nonzero(truth)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
            prediction = predictor.predict(box=box, multimask_output=False)[0][0]
            box_scores.append((mask_iou(prediction, truth), boundary_iou(prediction, truth)))
            coords, labels = point_prompt_from_mask(truth, 2, rng)
            prediction = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=False)[0][0]
            point_scores.append((mask_iou(prediction, truth), boundary_iou(prediction, truth)))
        per_image["box"].append(np.mean(box_scores, axis=0))
        per_image["point"].append(np.mean(point_scores, axis=0))
    for kind in ("box", "point"):
        expected = np.mean(per_image[kind], axis=0)
        assert result[kind]["miou"] == pytest.approx(expected[0])
        assert result[kind]["boundary_iou"] == pytest.approx(expected[1])


def test_an_empty_prediction_scores_zero():
    """Zero hypernetwork outputs make every logit exactly 0, which is not > 0: an empty mask."""

    class AllForeground:
        def __getitem__(self, index):
            return SegmentationSample(np.zeros((16, 16, 3), np.uint8), np.ones((1, 16, 16), bool), "full")

        def __len__(self):
            return 1

    torch.manual_seed(0)
    model = build_rwkv_sam("tiny", image_size=32)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(0.0)
    result = evaluate_model(model, AllForeground(), prompt_kinds=("box",))
    assert result["box"] == {"miou": 0.0, "boundary_iou": 0.0}


def test_markdown_table():
    table = results_to_markdown([{"dataset": "procedural:seed1", "images": 3, "box": {"miou": 0.9123, "boundary_iou": 0.705}}],
                                model_name="rwkv")
    assert table.splitlines()[0] == "| model | dataset | images | box mIoU | box BIoU |"
    assert table.splitlines()[2] == "| rwkv | procedural:seed1 | 3 | 91.2 | 70.5 |"


def test_cli_eval_writes_json_and_markdown(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_rwkv_sam(build_rwkv_sam("tiny", image_size=32), path)
    out = tmp_path / "report"
    assert main(["sam", "eval", "--checkpoint", str(path), "--dataset", "procedural:3:2", "--limit", "1",
                 "--prompts", "box", "--out", str(out), "--label", "tiny-random"]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["model"] == "tiny-random" and data["results"][0]["images"] == 1
    assert 0.0 <= data["results"][0]["box"]["miou"] <= 1.0
    assert "| tiny-random | procedural:seed3 | 1 |" in (tmp_path / "report.md").read_text()


def test_cli_eval_runs_the_model_at_another_input_size(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_rwkv_sam(build_rwkv_sam("tiny", image_size=32), path)
    out = tmp_path / "report"
    assert main(["sam", "eval", "--checkpoint", str(path), "--dataset", "procedural:3:2", "--limit", "1",
                 "--prompts", "box", "--image-size", "48", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["image_size"] == 48 and 0.0 <= data["results"][0]["box"]["miou"] <= 1.0
    assert main(["sam", "eval", "--checkpoint", str(path), "--dataset", "procedural:3:2", "--limit", "1",
                 "--prompts", "box", "--out", str(out)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["image_size"] == 32
    capsys.readouterr()
    assert main(["sam", "eval", "--checkpoint", str(path), "--dataset", "procedural:3:2", "--image-size", "40"]) != 0
    assert "multiple of 16, got 40" in capsys.readouterr().err

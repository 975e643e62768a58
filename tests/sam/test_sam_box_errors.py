"""benchmarks/sam_box_errors.py: box crowding and the pixel split on hand-made masks, and the script's
tables from a small random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import load_benchmark
from linmix.sam.model import build_rwkv_sam, save_rwkv_sam


def test_crowding_and_pixel_split_on_hand_made_masks():
    errors = load_benchmark("sam_box_errors")
    truth = np.zeros((20, 20), bool)
    truth[2:12, 2:12] = True  # 100 px, box rows/cols 2..11
    others = np.zeros((20, 20), bool)
    others[5:8, 5:15] = True  # 3 x 10 = 30 px, of which 3 x 7 = 21 inside the box
    assert errors.box_crowding(truth, others) == pytest.approx(0.21)
    prediction = truth.copy()
    prediction[2:4, 2:12] = False  # 20 target pixels missed
    prediction |= others  # 9 other-object pixels outside the target spilled onto
    prediction[15:17, 15:20] = True  # 10 background pixels
    split = errors.pixel_split(prediction, truth, others)
    union = 100 + 9 + 10
    assert split == pytest.approx({"hit": 80 / union, "missed": 20 / union, "on_other": 9 / union, "on_background": 10 / union})
    assert sum(split.values()) == pytest.approx(1.0)


def test_crowding_table_groups_objects():
    errors = load_benchmark("sam_box_errors")
    row = {"hit": 1.0, "missed": 0.0, "on_other": 0.0, "on_background": 0.0}
    rows = [{**row, "crowding": 0.0, "iou": 0.9}, {**row, "crowding": 0.0, "iou": 0.7}, {**row, "crowding": 3.0, "iou": 0.4}]
    table = errors.crowding_table(rows)
    assert [(entry["low"], entry["objects"]) for entry in table] == [(0.0, 2), (1.0, 1)]
    assert table[0]["iou"] == pytest.approx(0.8) and table[1]["iou"] == pytest.approx(0.4)


def test_script_prints_both_tables(tmp_path, capsys):
    errors = load_benchmark("sam_box_errors")
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_rwkv_sam(build_rwkv_sam("tiny", image_size=32), path)
    assert errors.main(["--checkpoint", str(path), "--dataset", "procedural:1:2", "--variants", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "box-prompted objects" in out and "| other objects in the box / target area |" in out
    scores = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
              if line.startswith("| ") and line.count("|") == 3 and not line.startswith("| box prompt")}
    assert len(scores) == 6 and all(0.0 <= value <= 1.0 for value in scores.values())
    # No selection rule beats choosing with the ground truth.
    assert scores["best of 4 by ground truth (upper bound)"] >= max(scores["best of 4 by IoU head"], scores["single mask (what eval uses)"])


def test_linear_probe_separates_separable_cells_and_not_noise():
    errors = load_benchmark("sam_box_errors")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 5, generator=generator)
    target = features[:, 2] + 0.5 * features[:, 4] > 0.3
    train = torch.arange(400) % 2 == 0
    logits = errors.fit_linear_probe(features, target, train)
    assert ((logits[~train] > 0) == target[~train]).float().mean() > 0.95
    # Labels unrelated to the features: held-out accuracy stays near chance.
    noise_target = torch.rand(400, generator=generator) > 0.5
    logits = errors.fit_linear_probe(features, noise_target, train)
    assert 0.3 < ((logits[~train] > 0) == noise_target[~train]).float().mean() < 0.7


def test_decoder_map_tap_is_what_the_mask_token_reads(tmp_path):
    """The model's own low-resolution logits are the first hypernetwork output dotted with the tapped map."""
    from linmix.sam.predictor import RwkvSamPredictor

    errors = load_benchmark("sam_box_errors")
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny", image_size=64).eval()
    predictor = RwkvSamPredictor(model)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (50, 64, 3), dtype=np.uint8))
    weights = {}
    handle = model.mask_decoder.output_hypernetworks_mlps[0].register_forward_hook(lambda _m, _i, out: weights.setdefault("w", out))
    with errors._DecoderMapTap(model.mask_decoder) as tap:
        _, _, low_res = predictor.predict(box=np.array([5, 6, 40, 30]), multimask_output=False, return_logits=True)
    handle.remove()
    assert "_hq_fuse" not in vars(model.mask_decoder)  # the tap is undone
    readout = torch.einsum("c,chw->hw", weights["w"][0].detach(), tap.map[0])
    torch.testing.assert_close(readout, torch.from_numpy(low_res[0]), atol=1e-4, rtol=1e-4)


def test_script_prints_the_probe_table(tmp_path, capsys):
    errors = load_benchmark("sam_box_errors")
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_rwkv_sam(build_rwkv_sam("tiny", image_size=64), path)
    assert errors.main(["--checkpoint", str(path), "--dataset", "procedural:1:3", "--probes", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| other objects"))
    assert all(name in header for name in errors.PROBES)
    total = next(line for line in out.splitlines() if line.startswith("| all |"))
    values = [float(cell) for cell in total.strip("|").split("|")[2:]]
    assert len(values) == len(errors.PROBES) and all(0.0 <= value <= 1.0 for value in values)

"""linmix.bench.decode and linmix.tour (and their commands) on tiny settings: what is measured and
written, state sizes that must stay flat (BASED) or grow (KV cache), IoUs recomputed from the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import linmix.mqar
from linmix.bench.decode import (
    DecodeBenchConfig,
    DecodeRun,
    build_decode_models,
    measure_decode,
    measure_decode_throughput,
    write_decode_report,
)
from linmix.cli import main
from linmix.data.examples import EXAMPLES, load_example_image, render_example
from linmix.tour import TourConfig, best_iou, distinct_colors, format_summary, run_tour
from tiny_sam import save_tiny_sam

TINY_DECODE = dict(contexts=(8, 40), d_model=64, n_layer=2, vocab_size=64, window=8, new_tokens=3, repeats=1)


def test_decode_config_validation():
    with pytest.raises(ValueError, match="multiple of 64"):
        DecodeBenchConfig(d_model=100)
    with pytest.raises(ValueError, match="contexts"):
        DecodeBenchConfig(contexts=(0, 8))
    with pytest.raises(ValueError, match="models"):
        DecodeBenchConfig(models=("GPT",))
    run = DecodeRun("BASED", 8, batch=2, decode_steps=10, decode_s=0.5, prefill_s=0.1, state_bytes=1)
    assert run.tokens_per_s == pytest.approx(40.0)  # 2 sequences x 10 steps / 0.5 s


def test_decode_models_have_matched_size_and_the_expected_state_growth():
    config = DecodeBenchConfig(**TINY_DECODE)
    models = build_decode_models(config)
    based, transformer = models["BASED"], models["Transformer++"]
    assert abs(transformer.num_parameters() - based.num_parameters()) / based.num_parameters() < 0.05
    assert "attention" not in based.config.layer_types and set(transformer.config.layer_types) == {"attention"}
    sizes = {}
    for name, model in models.items():
        for context in config.contexts:
            prompt = torch_prompt(context)
            prefill, decode, steps, state_bytes = measure_decode(model, prompt, new_tokens=3, max_seconds=60)
            assert steps == 3 and prefill > 0 and decode > 0
            sizes[name, context] = state_bytes
    assert sizes["BASED", 8] == sizes["BASED", 40]  # recurrent state: independent of the context
    assert sizes["Transformer++", 40] > sizes["Transformer++", 8]  # the KV cache grows with it


def torch_prompt(length: int):
    import torch

    return torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length))


def test_decode_report_files(tmp_path):
    config = DecodeBenchConfig(**TINY_DECODE)
    seen = []
    rows = measure_decode_throughput(config, progress=seen.append)
    assert [(r.model, r.context) for r in rows] == [("BASED", 8), ("Transformer++", 8), ("BASED", 40), ("Transformer++", 40)]
    assert len(seen) == 4 and all("tok/s" in line for line in seen)
    paths = write_decode_report(rows, tmp_path, config)
    payload = json.loads(paths["json"].read_text())
    assert payload["config"]["contexts"] == [8, 40] and len(payload["rows"]) == 4
    table = paths["table"].read_text().splitlines()
    assert table[0].startswith("| context T |") and "BASED / Transformer++" in table[0] and len(table) == 4
    ratio = rows[0].tokens_per_s / rows[1].tokens_per_s
    assert table[2].rstrip(" |").endswith(f"{ratio:.2f}x")
    with Image.open(paths["plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > 500


def test_bench_command(capsys, tmp_path):
    code = main(["bench", "--contexts", "8,24", "--layers", "2", "--d-model", "64", "--new-tokens", "2", "--repeats", "1",
                 "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| 8 |" in out and "| 24 |" in out and str(tmp_path / "decode.png") in out
    assert len(json.loads((tmp_path / "decode.json").read_text())["rows"]) == 4


# ---------------------------------------------------------------------------------------------
# the tour


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_tiny_sam(path, seed=6)
    return path


@pytest.fixture
def fake_mqar(monkeypatch):
    """Stands in for the MQAR study (minutes of training): records the call, writes a report file."""
    calls = []

    def run_preset(preset, out_dir, *, resume=True, progress=True):
        calls.append((preset, out_dir, resume))
        out_dir.mkdir(parents=True, exist_ok=True)
        return [{"model": "based-d64", "mean_accuracy": 0.91, "state_bytes": 8192}]

    def write_report(out_dir):
        plot = out_dir / "frontier.png"
        Image.new("RGB", (4, 4)).save(plot)
        return {"frontier_plot": plot}

    monkeypatch.setattr(linmix.mqar, "run_preset", run_preset, raising=False)
    monkeypatch.setattr(linmix.mqar, "write_report", write_report, raising=False)
    return calls


def test_tour_runs_every_stage_and_writes_the_pictures(tmp_path, checkpoint, fake_mqar):
    config = TourConfig(out_dir=tmp_path, sam_checkpoint=checkpoint, decode=DecodeBenchConfig(**TINY_DECODE), progress=False)
    lines = []
    results = run_tour(config, echo=lines.append)
    assert [r.name for r in results] == ["mqar", "segment", "decode"]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert fake_mqar == [("quick", tmp_path / "mqar", True)]
    mqar, segment, decode = results
    assert mqar.paths["frontier_plot"].is_file() and mqar.lines == ["based-d64, accuracy 0.910, state 8 KiB"]

    # Segmentation: one overlay per prompt, an overview, and IoUs that match the written masks.
    records = json.loads(segment.paths["scores"].read_text())
    assert len(records) == sum(len(e.prompts) for e in EXAMPLES)
    for record in records:
        truth = render_example(record["example"])[1][record["target"]]
        stem = f"{record['example']}.{record['prompt'].replace('+', '_')}"
        with Image.open(tmp_path / "segment" / f"{stem}.mask.png") as png:
            mask = np.asarray(png) == 255
        union = np.logical_or(mask, truth).sum()
        assert record["iou_vs_truth"] == pytest.approx(np.logical_and(mask, truth).sum() / union, abs=1e-4)
        assert (tmp_path / "segment" / f"{stem}.overlay.png").is_file()
    with Image.open(segment.paths["overview"]) as overview:
        assert overview.size[0] > 700
    assert segment.lines[0].startswith("mean IoU vs the drawn truth over 6 prompts")

    # Automatic masks: one overlay per image; per image a mask count and a best IoU per true object.
    auto = json.loads(segment.paths["auto"].read_text())
    assert auto["points_per_side"] == 16
    assert (auto["pred_iou_thresh"], auto["stability_score_thresh"]) == (0.88, 0.95)  # no sidecar: SAM's
    assert [record["example"] for record in auto["images"]] == [e.name for e in EXAMPLES]
    for record in auto["images"]:
        assert (tmp_path / "segment" / f"{record['example']}.auto.png").is_file()
        assert isinstance(record["masks"], int) and record["masks"] >= 0
        assert sorted(record["best_iou"]) == sorted(render_example(record["example"])[1])
        assert all(0.0 <= iou <= 1.0 for iou in record["best_iou"].values())
        assert any(line.startswith(f"{record['example']:14s} automatic: {record['masks']:3d} masks") for line in segment.lines)

    assert decode.paths["plot"].is_file() and len(decode.lines) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "ok", "ok"]
    text = format_summary(results, tmp_path)
    assert str(decode.paths["plot"]) in text and str(segment.paths["overview"]) in text and "[ok] mqar" in text


def test_tour_automatic_masks_counts_and_best_ious(tmp_path, checkpoint, monkeypatch):
    """With a generator that returns known masks, the counts and best IoUs are those of the masks,
    the stored thresholds beside the checkpoint are used, and the overlay shows every mask."""
    import linmix.sam

    sidecar = checkpoint.with_name(checkpoint.stem + ".auto_masks.json")
    sidecar.write_text(json.dumps({"pred_iou_thresh": 0.5, "stability_score_thresh": 0.6}))
    seen = []

    class KnownMasks:
        def __init__(self, model, **options):
            seen.append(options)

        def generate(self, image):
            name = next(e.name for e in EXAMPLES if np.array_equal(image, load_example_image(e.name)))
            truth = list(render_example(name)[1].values())
            half = truth[1].copy()
            half[: half.shape[0] // 2] = False  # the lower half of the second object
            masks = [truth[0], half] if name == "shapes" else []
            return [{"segmentation": m, "area": int(m.sum())} for m in masks]

    monkeypatch.setattr(linmix.sam, "AutomaticMaskGenerator", KnownMasks)
    try:
        config = TourConfig(out_dir=tmp_path, stages=("segment",), sam_checkpoint=checkpoint, progress=False)
        results = run_tour(config, echo=lambda line: None)
    finally:
        sidecar.unlink()
    assert results[0].status == "ok", results[0].error
    assert seen == [{"points_per_side": 16, "output_mode": "binary_mask", "pred_iou_thresh": 0.5, "stability_score_thresh": 0.6}]
    auto = {record["example"]: record for record in json.loads(results[0].paths["auto"].read_text())["images"]}
    truth = render_example("shapes")[1]
    first, second, third = truth
    half = truth[second].copy()
    half[: half.shape[0] // 2] = False
    assert auto["shapes"]["masks"] == 2
    assert auto["shapes"]["best_iou"][first] == 1.0
    assert auto["shapes"]["best_iou"][second] == pytest.approx(half.sum() / truth[second].sum(), abs=1e-4)
    expected_third = max(np.logical_and(m, truth[third]).sum() / np.logical_or(m, truth[third]).sum() for m in (truth[first], half))
    assert auto["shapes"]["best_iou"][third] == pytest.approx(expected_third, abs=1e-4)
    assert auto["overlap"]["masks"] == 0 and set(auto["overlap"]["best_iou"].values()) == {0.0}
    # The overlay tints exactly the masked pixels.
    with Image.open(tmp_path / "segment" / "shapes.auto.png") as png:
        overlay = np.asarray(png.convert("RGB"))
    image = load_example_image("shapes")
    changed = np.any(overlay != image, axis=-1)
    assert changed[truth[first]].mean() > 0.9 and changed[half].mean() > 0.9
    assert not changed[~(truth[first] | half)].any()


def test_best_iou_and_distinct_colors():
    target = np.zeros((10, 10), dtype=bool)
    target[2:6, 2:6] = True  # 16 pixels
    shifted = np.roll(target, 2, axis=1)  # overlaps 8 of them: IoU 8 / 24
    assert best_iou(target, np.zeros((0, 10, 10), dtype=bool)) == 0.0
    assert best_iou(target, np.stack([shifted])) == pytest.approx(8 / 24)
    assert best_iou(target, np.stack([shifted, target])) == 1.0
    colors = distinct_colors(40)
    assert len(colors) == len(set(colors)) == 40 and all(0 <= c <= 255 for rgb in colors for c in rgb)
    assert distinct_colors(0) and distinct_colors(3) == distinct_colors(40)[:3]


def test_a_failing_stage_does_not_stop_the_tour(tmp_path, checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(linmix.mqar, "run_preset", broken, raising=False)
    monkeypatch.setattr(linmix.mqar, "write_report", broken, raising=False)
    config = TourConfig(out_dir=tmp_path, stages=("mqar", "decode"), decode=DecodeBenchConfig(**TINY_DECODE), progress=False)
    results = run_tour(config, echo=lambda line: None)
    assert [r.status for r in results] == ["failed", "ok"]  # the decode stage still ran
    assert results[0].error == "RuntimeError: disk full"
    assert "Traceback" in (tmp_path / "mqar.error.txt").read_text()
    assert "[FAILED] mqar" in format_summary(results, tmp_path)


def test_tour_command(capsys, tmp_path, fake_mqar):
    code = main(["tour", "--only", "segment,mqar", "--skip", "segment", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "linmix tour: summary" in out and str(tmp_path / "mqar" / "frontier.png") in out
    assert [s["name"] for s in json.loads((tmp_path / "summary.json").read_text())["stages"]] == ["mqar"]


def test_tour_command_exit_status_when_a_stage_fails(capsys, tmp_path):
    code = main(["tour", "--only", "segment", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "missing.safetensors")])
    out = capsys.readouterr().out
    assert code == 1 and "[FAILED] segment" in out and "checkpoint not found" in out


def test_tour_sets_and_restores_threads(tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(linmix.mqar, "run_preset", lambda *a, **k: seen.append(torch.get_num_threads()) or [], raising=False)
    monkeypatch.setattr(linmix.mqar, "write_report", lambda out: {}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_tour(TourConfig(out_dir=tmp_path, stages=("mqar",), threads=1, progress=False), echo=lambda line: None)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        TourConfig(threads=0)

"""The sweep: batch order, early stop, learning-rate sweep, resume without redoing finished runs, report, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import linmix.mqar.sweep as sweep
from linmix.cli import main
from linmix.mqar import MQARModelConfig, MQARPreset, MQARSegment, get_preset, pareto_frontier, run_sweep, write_report
from linmix.mqar.data import generate_segments
from linmix.mqar.report import load_curves
from linmix.mqar.sweep import curve_gain, epoch_batches, evaluate, train_and_evaluate


def tiny_preset(**overrides) -> MQARPreset:
    fields = dict(
        name="tiny",
        vocab_size=32,
        train_segments=[MQARSegment(16, 2, 24), MQARSegment(16, 4, 8)],
        test_segments=[MQARSegment(16, 2, 8), MQARSegment(24, 4, 8)],
        models=[MQARModelConfig("based", 8, feature_dim=2), MQARModelConfig("sliding_window", 8, window=2)],
        epochs=2,
        learning_rates=[3e-3, 1e-2],
        train_batch_size=8,
        test_batch_size=4,
    )
    fields.update(overrides)
    return MQARPreset(**fields)


def test_epoch_batches_cover_each_example_once_and_are_reproducible():
    sizes = [10, 7]
    batches = epoch_batches(sizes, batch_size=4, seed=3, epoch=1)
    seen = {0: [], 1: []}
    for segment, indices in batches:
        assert len(indices) <= 4
        seen[segment] += indices.tolist()
    assert sorted(seen[0]) == list(range(10)) and sorted(seen[1]) == list(range(7))
    assert len(batches) == 3 + 2
    again = epoch_batches(sizes, batch_size=4, seed=3, epoch=1)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = epoch_batches(sizes, batch_size=4, seed=3, epoch=2)
    assert any(a[0] != b[0] or not torch.equal(a[1], b[1]) for a, b in zip(batches, other))


def test_evaluate_is_the_mean_of_per_example_accuracies():
    """Per example the fraction of its queries answered right (here 1/2, 1 and 0), then the mean."""
    labels = torch.tensor([[-100, 5, -100, 6], [7, -100, -100, -100], [-100, -100, 3, 4]])
    inputs = torch.arange(12).view(3, 4)  # distinct ids, so the fake model can look each position up
    predictions = torch.tensor([[0, 5, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]])

    class FixedAnswers(torch.nn.Module):
        def hidden_states(self, ids):
            return ids

        def logits(self, ids):
            return torch.nn.functional.one_hot(predictions.view(-1)[ids], 8).float()

    accuracies = evaluate(FixedAnswers(), [(inputs, labels)], batch_size=2)
    assert accuracies == [pytest.approx((0.5 + 1.0 + 0.0) / 3)]


def test_early_stop_after_the_first_epoch_that_reaches_the_target():
    preset = tiny_preset(early_stop_accuracy=0.0, epochs=3)
    train = generate_segments(preset.vocab_size, preset.train_segments, preset.train_seed)
    test = generate_segments(preset.vocab_size, preset.test_segments, preset.test_seed)
    record = train_and_evaluate(preset.models[0], preset, 3e-3, train, test)
    assert record["epochs"] == 1
    assert record["steps"] == 3 + 1  # 24 / 8 + 8 / 8 batches in one epoch
    assert set(record["accuracy"]) == {"L16_N2", "L24_N4"}


def test_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    preset = tiny_preset(epochs=1)
    calls = []
    original = sweep.train_and_evaluate

    def counting(config, *args, **kwargs):
        calls.append(config.name)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_and_evaluate", counting)
    # a sweep stopped after its first model ...
    first = run_sweep(preset, tmp_path, models=["based_d8_f2"], progress=False, workers=1)
    assert calls == ["based_d8_f2", "based_d8_f2"]  # both learning rates
    assert len(first) == 1
    # ... resumes with the other model only
    rows = run_sweep(preset, tmp_path, progress=False, workers=1)
    assert calls[2:] == ["sliding_window_d8_w2", "sliding_window_d8_w2"]
    assert [r["model"] for r in rows] == ["based_d8_f2", "sliding_window_d8_w2"]
    assert rows[0] == first[0]
    # a finished sweep trains nothing
    again = run_sweep(preset, tmp_path, progress=False, workers=1)
    assert len(calls) == 4 and again == rows

    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in results] == ["based_d8_f2", "sliding_window_d8_w2"]
    row = results[0]
    by_lr = {run["lr"]: run["mean_accuracy"] for run in runs if run["model"] == "based_d8_f2"}
    assert row["best_lr"] == max(by_lr, key=by_lr.get)
    assert row["state_bytes"] == sweep.state_size_bytes(preset.models[0], 24)
    for key in ("config", "accuracy", "train_seconds", "best_lr", "state_bytes"):
        assert key in row

    # sweeping fewer learning rates reuses the finished runs (a run does not depend on the others)
    fewer = run_sweep(dataclasses.replace(preset, learning_rates=[1e-2]), tmp_path, progress=False, workers=1)
    assert len(calls) == 4
    assert [list(r["accuracy_by_lr"]) for r in fewer] == [["0.01"], ["0.01"]]

    # a half-written last line (a kill mid-write) is ignored and that run redone
    with (tmp_path / "runs.jsonl").open("a") as handle:
        handle.write('{"model": "based_d8')
    run_sweep(preset, tmp_path, progress=False, workers=1)
    assert len(calls) == 4
    # and a record appended after such a line stays whole
    sweep._append_jsonl(tmp_path / "runs.jsonl", {"model": "x", "lr": 1.0})
    assert sweep._read_jsonl(tmp_path / "runs.jsonl")[-1] == {"model": "x", "lr": 1.0}


def test_sweep_refuses_a_directory_with_other_settings_and_restarts_on_request(tmp_path):
    preset = tiny_preset(epochs=1, models=[MQARModelConfig("based", 8, feature_dim=2)], learning_rates=[3e-3])
    run_sweep(preset, tmp_path, progress=False, workers=1)
    changed = dataclasses.replace(preset, vocab_size=40)
    with pytest.raises(ValueError, match="different data or training settings"):
        run_sweep(changed, tmp_path, progress=False, workers=1)
    rows = run_sweep(changed, tmp_path, resume=False, progress=False, workers=1)
    assert len(rows) == 1
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1


def test_learning_rate_sweep_stops_once_solved(tmp_path, monkeypatch):
    preset = tiny_preset(epochs=1, models=[MQARModelConfig("based", 8, feature_dim=2)], early_stop_accuracy=0.0,
                         stop_lr_sweep_when_solved=True)
    rows = run_sweep(preset, tmp_path, progress=False, workers=1)
    assert list(rows[0]["accuracy_by_lr"]) == ["0.003"]


def test_unknown_model_and_bad_preset_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown models"):
        run_sweep(tiny_preset(), tmp_path, models=["mamba"], progress=False)
    with pytest.raises(ValueError, match="unknown MQAR preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="must differ"):
        tiny_preset(test_seed=0)


def test_presets_follow_the_protocol():
    paper = get_preset("paper")
    assert paper.vocab_size == 8192 and paper.epochs == 32
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in paper.train_segments] == [
        (64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]
    assert sum(s.num_examples for s in paper.train_segments) == 180_000
    assert [(s.seq_len, s.num_kv_pairs) for s in paper.test_segments][-1] == (1024, 256)
    assert paper.learning_rates == [1e-3, 3.16e-3, 1e-2, 3.16e-2] and paper.weight_decay == 0.1
    for name in ("paper", "cpu", "quick"):
        preset = get_preset(name)
        assert MQARPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
        for segment in preset.train_segments + preset.test_segments:
            assert 4 * segment.num_kv_pairs <= segment.seq_len < preset.vocab_size
        assert preset.train_seed != preset.test_seed


def test_report_table_plot_and_pareto_frontier(tmp_path):
    assert pareto_frontier([(10, 0.5), (5, 0.2), (20, 0.4), (40, 0.9), (5, 0.3)]) == [(5, 0.3), (10, 0.5), (40, 0.9)]
    preset = tiny_preset(epochs=1, learning_rates=[3e-3])
    run_sweep(preset, tmp_path, progress=False, workers=1)
    paths = write_report(tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert paths["table"].endswith("results.md") and paths["plot"].endswith("pareto.png")
    assert paths["curves"].endswith("curves.png") and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gain, last 1/4" in table
    assert "| `based_d8_f2` |" in table and "L24_N4" in table
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_and_errors(tmp_path, capsys):
    preset = tiny_preset(epochs=1, learning_rates=[3e-3], models=[MQARModelConfig("based", 8, feature_dim=2)])
    run_sweep(preset, tmp_path, progress=False, workers=1)
    assert main(["mqar", "report", str(tmp_path)]) == 0
    assert "based_d8_f2" in capsys.readouterr().out
    assert main(["mqar", "report", str(tmp_path / "missing")]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["mqar", "run", "--preset", "huge", "--out", str(tmp_path / "x")]) == 1
    assert "unknown MQAR preset" in capsys.readouterr().err


def test_cli_run_passes_its_options(tmp_path, monkeypatch, capsys):
    import linmix.mqar

    seen = {}

    def fake_run_preset(preset, out, **kwargs):
        seen.update(preset=preset, out=out, **kwargs)
        return []

    monkeypatch.setattr(linmix.mqar, "run_preset", fake_run_preset)
    monkeypatch.setattr(linmix.mqar, "write_report", lambda out: {"table": "t", "plot": "p"})
    code = main(["mqar", "run", "--preset", "cpu", "--out", str(tmp_path), "--models", "based,mamba", "--models", "attention_d64",
                 "--restart", "--workers", "2", "--no-progress"])
    assert code == 0
    assert seen["preset"] == "cpu" and seen["models"] == ["based", "mamba", "attention_d64"]
    assert seen["resume"] is False and seen["workers"] == 2 and seen["progress"] is False


@pytest.mark.slow
def test_parallel_workers_give_the_same_results(tmp_path):
    preset = tiny_preset(epochs=1, learning_rates=[3e-3])
    serial = run_sweep(preset, tmp_path / "serial", progress=False, workers=1)
    parallel = run_sweep(preset, tmp_path / "parallel", progress=False, workers=2)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(serial) == strip(parallel)


@pytest.mark.slow
def test_quick_preset_shows_the_ordering(tmp_path):
    rows = {r["mixer"]: r for r in linmix_quick(tmp_path)}
    assert rows["attention"]["mean_accuracy"] >= 0.95
    assert rows["based"]["mean_accuracy"] > rows["sliding_window"]["mean_accuracy"]


def linmix_quick(out):
    from linmix.mqar import run_preset

    return run_preset("quick", out, progress=False)


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k}


def test_fresh_training_data_is_generated_per_epoch_from_seed_and_epoch(monkeypatch):
    preset = tiny_preset(fresh_train_data=True, epochs=3, early_stop_accuracy=2.0, train_seed=7)
    calls = []
    original = sweep.generate_epoch_segments

    def recording(vocab_size, segments, seed, epoch, **kwargs):
        calls.append((seed, epoch))
        return original(vocab_size, segments, seed, epoch, **kwargs)

    monkeypatch.setattr(sweep, "generate_epoch_segments", recording)
    record = train_and_evaluate(preset.models[0], preset, 3e-3)
    assert calls == [(7, 0), (7, 1), (7, 2)]
    assert record["steps"] == 3 * (3 + 1) and record["epochs"] == 3
    # the same run again is identical to the last digit (what makes a resumed sweep identical)
    assert _without_times(train_and_evaluate(preset.models[0], preset, 3e-3)) == _without_times(record)
    # fresh data is not the fixed data: the same model trained on repeated examples ends elsewhere
    fixed = train_and_evaluate(preset.models[0], dataclasses.replace(preset, fresh_train_data=False), 3e-3)
    assert fixed["final_train_loss"] != record["final_train_loss"]
    with pytest.raises(ValueError, match="train_data=None"):
        train_and_evaluate(preset.models[0], preset, 3e-3, generate_segments(32, preset.train_segments, 0))


def test_run_records_the_accuracy_curve_one_point_per_epoch():
    preset = tiny_preset(fresh_train_data=True, epochs=3, early_stop_accuracy=2.0)
    record = train_and_evaluate(preset.models[0], preset, 1e-2)
    curve = record["curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert [p["step"] for p in curve] == [4, 8, 12]
    assert [p["examples"] for p in curve] == [32, 64, 96]  # 24 + 8 examples an epoch
    assert curve[-1]["accuracy"] == record["accuracy"] and curve[-1]["mean_accuracy"] == record["mean_accuracy"]
    for point in curve:
        assert point["mean_accuracy"] == pytest.approx(sum(point["accuracy"].values()) / 2)
        assert point["train_loss"] > 0
    # the loss falls from the first epoch to the last on this easy task at lr 1e-2
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]


def test_curve_gain_is_the_rise_over_the_last_quarter_of_the_epochs():
    curve = [{"mean_accuracy": a} for a in (0.1, 0.3, 0.5, 0.6, 0.62, 0.63, 0.63, 0.64)]
    assert curve_gain(curve) == pytest.approx(0.64 - 0.63)  # 8 epochs: compares with 2 epochs back
    assert curve_gain(curve[:4]) == pytest.approx(0.6 - 0.5)
    assert curve_gain(curve[:1]) is None


def test_learning_rate_sweep_reports_the_best_rate_with_its_own_curve_and_accuracies(tmp_path, monkeypatch):
    preset = tiny_preset(learning_rates=[1e-3, 3e-3, 1e-2], models=[MQARModelConfig("based", 8, feature_dim=2)])
    score = {1e-3: 0.2, 3e-3: 0.7, 1e-2: 0.4}

    def fake_run(config, preset, lr, train_data, test_data, **kwargs):
        curve = [{"epoch": e, "step": 4 * e, "examples": 32 * e, "train_loss": 1.0, "mean_accuracy": score[lr] * e / 2,
                  "accuracy": {"L16_N2": score[lr] * e / 2, "L24_N4": score[lr] * e / 2}} for e in (1, 2)]
        return {"model": config.name, "lr": lr, "accuracy": {"L16_N2": score[lr], "L24_N4": score[lr]},
                "mean_accuracy": score[lr], "steps": 8, "epochs": 2, "diverged": False, "final_train_loss": 1.0,
                "train_seconds": 1.0, "parameters": 10, "curve": curve}

    monkeypatch.setattr(sweep, "train_and_evaluate", fake_run)
    row = run_sweep(preset, tmp_path, progress=False, workers=1)[0]
    assert row["best_lr"] == 3e-3 and row["mean_accuracy"] == 0.7
    assert row["accuracy_by_lr"] == {"0.001": 0.2, "0.003": 0.7, "0.01": 0.4}
    assert row["curve"][-1]["mean_accuracy"] == 0.7 and row["curve_gain_last_quarter"] == pytest.approx(0.35)
    assert row["steps"] == 8
    curves = load_curves(tmp_path)
    assert sorted(curves["based_d8_f2"]) == [1e-3, 3e-3, 1e-2]
    assert curves["based_d8_f2"][1e-2][0]["mean_accuracy"] == pytest.approx(0.2)


def test_a_resumed_fresh_data_sweep_keeps_finished_runs_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    preset = tiny_preset(fresh_train_data=True, epochs=2, learning_rates=[3e-3, 1e-2])
    uninterrupted = run_sweep(preset, tmp_path / "whole", progress=False, workers=1)
    calls = []
    original = sweep.train_and_evaluate

    def counting(config, preset, lr, *args, **kwargs):
        calls.append((config.name, lr))
        return original(config, preset, lr, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_and_evaluate", counting)
    run_sweep(preset, tmp_path / "pieces", models=["based_d8_f2"], progress=False, workers=1)  # stopped here ...
    finished = (tmp_path / "pieces" / "runs.jsonl").read_text()
    resumed = run_sweep(preset, tmp_path / "pieces", progress=False, workers=1)  # ... and resumed
    assert calls == [("based_d8_f2", 3e-3), ("based_d8_f2", 1e-2), ("sliding_window_d8_w2", 3e-3), ("sliding_window_d8_w2", 1e-2)]
    assert (tmp_path / "pieces" / "runs.jsonl").read_text().startswith(finished)  # finished runs kept as written
    assert [_without_times(r) for r in resumed] == [_without_times(r) for r in uninterrupted]
    # switching fresh data off is another protocol: that directory is refused
    with pytest.raises(ValueError, match="different data or training settings"):
        run_sweep(dataclasses.replace(preset, fresh_train_data=False), tmp_path / "pieces", progress=False, workers=1)


def test_cpu_and_quick_presets_sweep_learning_rates_on_fresh_data():
    cpu = get_preset("cpu")
    assert {1e-3, 3e-3, 1e-2} <= set(cpu.learning_rates)
    assert cpu.fresh_train_data
    assert {c.mixer for c in cpu.models} >= {"attention", "based", "mamba", "sliding_window"}
    quick = get_preset("quick")
    assert quick.fresh_train_data and len(quick.learning_rates) >= 2
    # quick stays a few minutes: no more steps than before the rework
    assert quick.epochs * quick.steps_per_epoch * len(quick.learning_rates) <= 2 * 564


def test_budget_estimate_adds_up_learning_rates_epochs_batches_and_evaluations():
    from linmix.mqar.budget import estimate_sweep_seconds, time_model

    preset = tiny_preset(epochs=3, learning_rates=[1e-3, 1e-2])  # 3 + 1 batches an epoch (24 and 8 examples, batch 8)
    timings = {
        "based_d8_f2": {"step_seconds": {"L16_N2": 0.5, "L16_N4": 1.0}, "eval_seconds": 2.0},
        "sliding_window_d8_w2": {"step_seconds": {"L16_N2": 0.1, "L16_N4": 0.1}, "eval_seconds": 0.0},
    }
    estimate = estimate_sweep_seconds(preset, timings, workers=2, slowdown=1.5)
    based = 1.5 * 2 * 3 * (3 * 0.5 + 1 * 1.0 + 2.0)  # slowdown x lrs x epochs x (batches + eval)
    window = 1.5 * 2 * 3 * (4 * 0.1)
    assert estimate["per_model_seconds"] == {"based_d8_f2": pytest.approx(based), "sliding_window_d8_w2": pytest.approx(window)}
    assert estimate["cpu_seconds"] == pytest.approx(based + window)
    assert estimate["wall_seconds"] == pytest.approx(based)  # the slowest model bounds the wall time from below
    measured = time_model(preset.models[0], preset, steps=1)
    assert set(measured["step_seconds"]) == {"L16_N2", "L16_N4"} and measured["eval_seconds"] > 0


def test_optimizer_exempts_what_layers_mark_no_weight_decay_such_as_mamba_a_log():
    from linmix.mqar import MQARModel

    model = MQARModel(MQARModelConfig("mamba", 16, d_state=4), vocab_size=32, max_len=32)
    optimizer = sweep.build_optimizer(model, 1e-3, 0.1)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    mamba = model.mixers[1]
    assert decay_of[id(mamba.A_log)] == 0.0 and decay_of[id(mamba.D)] == 0.0
    assert decay_of[id(mamba.in_proj.weight)] == 0.1 and decay_of[id(model.embedding.weight)] == 0.0
    assert len(decay_of) == len(list(model.parameters()))  # every parameter exactly once
    assert optimizer.defaults["betas"] == (0.9, 0.98)


def test_long_run_script_trains_longer_and_records_the_curve(tmp_path, monkeypatch, capsys):
    """benchmarks/mqar_long_run.py: the preset's model and data with only the epochs changed; one JSON
    line per model with a curve point per epoch; unknown models are refused by name."""
    from helpers import load_benchmark

    long_run = load_benchmark("mqar_long_run")
    monkeypatch.setattr(long_run, "get_preset", lambda name: tiny_preset(fresh_train_data=True))
    out = tmp_path / "long.jsonl"
    long_run.main(["--preset", "tiny", "--models", "based_d8_f2", "--lr", "3e-3", "--epochs", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert (record["model"], record["lr"], record["epochs_planned"], record["epochs"]) == ("based_d8_f2", 3e-3, 3, 3)
    assert [point["epoch"] for point in record["curve"]] == [1, 2, 3]
    # the same run through the sweep's own function (3 epochs) gives the same numbers: only epochs differ
    expected = train_and_evaluate(tiny_preset(fresh_train_data=True, epochs=3).models[0], tiny_preset(fresh_train_data=True, epochs=3), 3e-3)
    assert record["accuracy"] == expected["accuracy"] and record["final_train_loss"] == expected["final_train_loss"]
    assert "based_d8_f2 lr 0.003, 3 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        long_run.main(["--preset", "tiny", "--models", "mamba_d64_n16", "--lr", "3e-3", "--epochs", "3", "--out", str(out)])

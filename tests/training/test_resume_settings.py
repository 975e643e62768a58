"""The Trainer refuses to resume a run with other settings (naming the keys), allows those that may
change on resume, and reads checkpoints written before settings were stored."""
from __future__ import annotations

import json

import pytest
import torch

from linmix.training import RESUMABLE_TRAIN_KEYS, TrainConfig, Trainer, check_resume_settings, latest_checkpoint, read_metrics
from linmix.training.trainer import SETTINGS_FILE
from toy_training import ToyBatches, build_toy_model, toy_loss


def _fit(out_dir, *, settings=None, resumable=(), **overrides):
    values = dict(out_dir=str(out_dir), max_steps=4, lr=3e-2, warmup_steps=2, save_every=2, log_every=1, progress=False)
    config = TrainConfig(**{**values, **overrides})
    trainer = Trainer(build_toy_model(), config, loss_fn=toy_loss, batches=ToyBatches(grad_accum=config.grad_accum),
                      items_name="samples", settings=settings, resumable=resumable)
    return trainer.fit()


def test_changed_settings_are_refused_with_their_names(tmp_path):
    _fit(tmp_path, settings={"toy": {"width": 32, "note": "a"}})
    stored = json.loads((latest_checkpoint(tmp_path) / SETTINGS_FILE).read_text())
    assert stored["train"]["lr"] == 3e-2 and stored["toy"] == {"width": 32, "note": "a"}
    with pytest.raises(ValueError) as error:
        _fit(tmp_path, settings={"toy": {"width": 64, "note": "a"}}, lr=1e-2, betas=(0.9, 0.999), max_steps=6)
    message = str(error.value)
    assert "different settings" in message and str(tmp_path) in message
    assert "train.lr: 0.03 -> 0.01" in message and "toy.width: 32 -> 64" in message
    assert "train.betas: [0.9, 0.95] -> [0.9, 0.999]" in message
    assert "train.max_steps:" not in message and "toy.note" not in message  # allowed / unchanged: not listed
    # nothing was trained by the refused resume
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r) == 4


def test_resume_may_extend_the_run_and_change_bookkeeping(tmp_path):
    assert {"max_steps", "log_every", "save_every", "threads", "keep_checkpoints", "progress"} <= RESUMABLE_TRAIN_KEYS
    _fit(tmp_path, settings={"toy": {"width": 32, "eval_data": "a"}})
    summary = _fit(tmp_path, settings={"toy": {"width": 32, "eval_data": "b"}}, resumable=("toy.eval_data",),
                   max_steps=6, log_every=2, save_every=3, keep_checkpoints=3, threads=torch.get_num_threads())
    assert summary["resumed_from"] == 4 and summary["step"] == 6
    # the eval_data change allowed here is refused where the trainer does not list it
    with pytest.raises(ValueError, match="toy.eval_data: 'b' -> 'c'"):
        check_resume_settings(tmp_path, {"train": {}, "toy": {"eval_data": "c"}})
    check_resume_settings(tmp_path, {"train": {}, "toy": {"eval_data": "c"}}, resumable=["toy.eval_data"])


def test_resume_off_or_nothing_to_resume_checks_nothing(tmp_path):
    check_resume_settings(tmp_path / "empty", {"train": {"lr": 1.0}})
    _fit(tmp_path, settings={"toy": {"width": 32}})
    summary = _fit(tmp_path, settings={"toy": {"width": 64}}, resume=False)  # starts over
    assert summary["resumed_from"] == 0


def test_checkpoints_without_a_settings_file_compare_the_trainer_config(tmp_path):
    _fit(tmp_path)
    for folder in (tmp_path / "checkpoints").glob("step-*"):
        (folder / SETTINGS_FILE).unlink()  # as written before settings were stored
    with pytest.raises(ValueError, match="train.lr: 0.03 -> 0.01"):
        check_resume_settings(tmp_path, {"train": TrainConfig(out_dir=str(tmp_path), lr=1e-2, max_steps=4, warmup_steps=2,
                                                              save_every=2, log_every=1, progress=False).to_dict(),
                                         "toy": {"anything": 1}})


def test_the_trainer_section_is_its_own():
    with pytest.raises(ValueError, match="'train' section"):
        Trainer(build_toy_model(), TrainConfig(), loss_fn=toy_loss, batches=ToyBatches(grad_accum=1),
                settings={"train": {}})


def test_warmup_is_capped_at_max_steps_and_eps_is_validated():
    short = TrainConfig(max_steps=4, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert [short.lr_at(step) for step in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    with pytest.raises(ValueError, match="eps"):
        TrainConfig(eps=0.0)
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.0))

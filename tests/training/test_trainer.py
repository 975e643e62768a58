import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from linmix.training import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    parameter_groups,
    read_metrics,
    warmup_cosine_multiplier,
)
from toy_training import ToyBatches, build_toy_model, run_toy, toy_loss

SCRIPT = Path(__file__).with_name("toy_training.py")


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r}


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent), env.get("PYTHONPATH", "")])
    return env


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_parameter_groups_no_decay_on_norms_biases_embeddings_and_skips_frozen_and_tied():
    model = TiedModel()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.embed.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)
    }
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)


def test_warmup_cosine_schedule_values():
    kwargs = dict(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert warmup_cosine_multiplier(0, **kwargs) == pytest.approx(0.25)
    assert warmup_cosine_multiplier(3, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine_multiplier(4, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine_multiplier(9, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through decay
    assert warmup_cosine_multiplier(14, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine_multiplier(100, **kwargs) == pytest.approx(0.1)


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("grad_accum", 0), ("lr", 0.0), ("precision", "fp8"),
                                          ("distributed", "zero3"), ("min_lr_ratio", 2.0)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_json_round_trip():
    config = TrainConfig(out_dir="x", max_steps=7, betas=(0.8, 0.9))
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"max_step": 3})


def test_training_reduces_loss_and_writes_metrics_and_checkpoints(tmp_path):
    result = run_toy(tmp_path, max_steps=30, save_every=10, log_every=5)
    losses = _losses(tmp_path)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < 0.5 * losses[5]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all({"lr", "samples_per_s", "grad_norm", "abs_error"} <= set(r) for r in records)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000030" and result["checkpoint"] == str(latest)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000020", "step-00000030"]
    model_state, trainer_state = load_checkpoint(latest)
    assert trainer_state["step"] == 30 and set(model_state) == set(build_toy_model().state_dict())


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    """Two micro-batches of 8 accumulate to the same update as the mean over both."""
    run_toy(tmp_path / "accum", max_steps=5, save_every=5, grad_accum=2)
    batches = ToyBatches(grad_accum=2)

    class Merged:
        def get(self, step, micro, rank, world):
            a, b = batches.get(step, 0, 0, 1), batches.get(step, 1, 0, 1)
            return {key: torch.cat([a[key], b[key]]) for key in a}

    config = TrainConfig(out_dir=str(tmp_path / "merged"), max_steps=5, lr=3e-2, warmup_steps=2, save_every=5,
                         log_every=1, progress=False)
    Trainer(build_toy_model(0), config, loss_fn=toy_loss, batches=Merged()).fit()
    accum, merged = _losses(tmp_path / "accum"), _losses(tmp_path / "merged")
    assert accum.keys() == merged.keys()
    for step in accum:
        assert accum[step] == pytest.approx(merged[step], rel=1e-5)


def test_resume_after_crash_continues_the_curve_exactly(tmp_path):
    run_toy(tmp_path / "full", max_steps=12, save_every=4)

    class Crash(Exception):
        pass

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # step 10, after the checkpoint at step 8
            raise Crash()
        return toy_loss(model, batch)

    config = TrainConfig(out_dir=str(tmp_path / "crash"), max_steps=12, lr=3e-2, warmup_steps=2, save_every=4,
                         log_every=1, progress=False)
    with pytest.raises(Crash):
        Trainer(build_toy_model(0), config, loss_fn=crashing_loss, batches=ToyBatches(grad_accum=1)).fit()
    assert latest_checkpoint(tmp_path / "crash").name == "step-00000008"
    # A different initial model: everything must come from the checkpoint.
    result = run_toy(tmp_path / "crash", max_steps=12, save_every=4, model_seed=99)
    assert result["resumed_from"] == 8
    assert _losses(tmp_path / "crash") == _losses(tmp_path / "full")


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    run_toy(tmp_path, max_steps=4, save_every=2)
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir()  # a folder without files, as if killed mid-copy
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(root / "step-00000009")


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    env = _env()
    args = ["--max-steps", "16", "--save-every", "4"]
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full"), *args], env=env, check=True,
                   capture_output=True, timeout=120)
    env_slow = dict(env, TOY_STEP_SLEEP="0.15")
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "killed"), *args], env=env_slow,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.exists() and pointer.read_text().strip() >= "step-00000008":
            break
        if process.poll() is not None:
            pytest.fail("the training process ended before it could be killed")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and killed_at.name < "step-00000016"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "killed"), *args], env=env, check=True,
                   capture_output=True, timeout=120)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == full  # bit-for-bit: same batches, same optimizer state, same RNG


def _torchrun(out_dir, *extra):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the interpreter")
    command = [torchrun, "--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out_dir), "--max-steps", "6",
               "--save-every", "3", *extra]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_torchrun_ddp_two_processes_match_single_process_accumulation(tmp_path):
    """2 ranks x 1 micro-batch see the same samples as 1 rank x 2 micro-batches: same curve."""
    _torchrun(tmp_path / "ddp")
    run_toy(tmp_path / "single", max_steps=6, save_every=3, grad_accum=2)
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert sorted(ddp) == list(range(1, 7))
    for step in ddp:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5)
    model_state, trainer_state = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert trainer_state["world_size"] == 2 and len(trainer_state["rng"]) == 2
    assert set(model_state) == set(build_toy_model().state_dict())  # no "module." prefix


@pytest.mark.slow
def test_torchrun_fsdp_two_processes_match_single_process(tmp_path):
    _torchrun(tmp_path / "fsdp", "--distributed", "fsdp")
    run_toy(tmp_path / "single", max_steps=6, save_every=3, grad_accum=2)
    fsdp, single = _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)
    # Resuming the FSDP run from its step-3 checkpoint reproduces steps 4..6.
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000006")
    (tmp_path / "fsdp" / "checkpoints" / "latest").write_text("step-00000003\n")
    _torchrun(tmp_path / "fsdp", "--distributed", "fsdp")
    for step in single:
        assert _losses(tmp_path / "fsdp")[step] == pytest.approx(single[step], rel=1e-5)

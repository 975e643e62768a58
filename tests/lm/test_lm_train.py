"""`linmix lm train` end to end: outputs, exact resume after SIGKILL, torchrun DDP on CPU (gloo)."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linmix.cli import main
from linmix.lm.evaluate import evaluate_perplexity, load_model
from linmix.training import TrainConfig, read_metrics

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "train").mkdir()
    for i in range(3):
        (root / "train" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    (root / "heldout.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)))
    return root


def _args(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["lm", "train", "--data", str(corpus / "train"), "--out-dir", str(out_dir), "--model", "based-tiny",
            "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", *extra]


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def test_train_writes_metrics_checkpoints_and_a_loadable_model_with_its_heldout_perplexity(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_args(corpus, out, "--max-steps", "6", "--log-every", "2", "--save-every", "3",
                      "--eval-data", str(corpus / "heldout.txt")))
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 6/6 | loss" in printed and "tokens/s" in printed and "lr" in printed
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    # a log line every 2 steps, and a checkpoint (every 3) closes a window too
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    config = TrainConfig(max_steps=6, lr=3e-3, warmup_steps=2)
    for record in records:
        assert record["lr"] == pytest.approx(config.lr_at(record["step"] - 1))
        assert record["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(record["loss"]))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
    model = load_model(out / "model")
    assert model.config.vocab_size == 257  # byte-level fallback tokenizer
    assert (out / "model" / "byte_tokenizer.json").is_file()
    reported = json.loads((out / "eval.json").read_text())
    text = (corpus / "heldout.txt").read_text()
    expected = evaluate_perplexity(model, list(text.encode()) + [256], seq_len=32, n_bytes=len(text))
    assert reported["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert reported["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    # the final model differs from the checkpoint at step 3 (training moved it)
    early = load_model(out / "checkpoints" / "step-00000003")
    assert not torch.equal(early.lm_head.weight, model.lm_head.weight)
    # the run folder holds its resolved recipe
    from linmix.lm.train import LMRecipe

    written = LMRecipe.from_file(out / "recipe.toml")
    assert (written.lm.seq_len, written.train.max_steps, written.train.lr) == (32, 6, 3e-3)
    assert written.lm.eval_data == str(corpus / "heldout.txt")
    # a finished run resumed with the same settings has nothing to do; other settings are refused
    assert main(_args(corpus, out, "--max-steps", "6", "--log-every", "2", "--save-every", "3")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(_args(corpus, out, "--max-steps", "6", "--seq-len", "16", "--betas", "0.9,0.99")) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "lm.seq_len: 32 -> 16" in err and "train.betas: [0.9, 0.95] -> [0.9, 0.99]" in err
    # the run folder's recipe (rewritten by the resume above, without held-out data) reruns it, one step longer
    assert main(["lm", "train", "--config", str(out / "recipe.toml"), "--max-steps", "7", "--log-every", "1"]) == 0
    assert "resuming from step 6" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1] == 7


def test_train_rejects_bad_input_with_one_line(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path / "a", "--max-steps", "2", "--max-tokens", "100")) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["lm", "train", "--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "b")]) == 1
    assert "no text data" in capsys.readouterr().err
    assert main(_args(corpus, tmp_path / "c", "--batch-size", "3", "--grad-accum", "2")) == 1
    assert "divisible" in capsys.readouterr().err


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "linmix.cli", *args]


@pytest.fixture
def one_thread():
    """One intra-op thread, as in the subprocesses: bit-identical reductions in every compared run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkilled_run_resumes_and_continues_the_loss_curve_exactly(corpus, tmp_path, one_thread, capsys):
    steps = ["--max-steps", "30", "--log-every", "1", "--save-every", "4"]
    assert main(_args(corpus, tmp_path / "reference", *steps)) == 0
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_cli(*_args(corpus, killed_dir, *steps)), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(step for step, _ in _losses(killed_dir))
    assert killed_at < 30
    capsys.readouterr()
    assert main(_args(corpus, killed_dir, *steps)) == 0
    assert "resuming from step" in capsys.readouterr().out
    # the records after the checkpoint were dropped and rewritten: one record per step, identical
    assert _losses(killed_dir) == _losses(tmp_path / "reference")
    assert [step for step, _ in _losses(killed_dir)] == list(range(1, 31))
    a, b = load_model(killed_dir / "model"), load_model(tmp_path / "reference" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "linmix.cli", *args]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_match_one_process(corpus, tmp_path, strategy, one_thread):
    steps = ["--max-steps", "4", "--log-every", "1", "--save-every", "4", "--distributed", strategy]
    assert main(_args(corpus, tmp_path / "single", *steps)) == 0
    double = subprocess.run(_torchrun(2, *_args(corpus, tmp_path / "ddp", *steps)), env=_env(), capture_output=True,
                            text=True, timeout=240)
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-4000:]
    # same global batch: each rank takes half of the one-process batch, gradients are averaged
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)
    final_one, final_two = load_model(tmp_path / "single" / "model"), load_model(tmp_path / "ddp" / "model")
    for (name, x), (_, y) in zip(final_one.state_dict().items(), final_two.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4, msg=name)
    if strategy == "ddp":
        # both ranks print a digest of their final weights (their lines may interleave)
        digests = dict(re.findall(r"rank (\d)/2: final weights sha256 ([0-9a-f]{16})", double.stdout))
        assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], double.stdout[-2000:]

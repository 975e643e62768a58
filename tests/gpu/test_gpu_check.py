"""benchmarks/gpu_check.py runs end to end in --tiny mode on CPU, so it is known to work when a GPU comes."""

import importlib.util
import json
import os

import pytest
import torch

from helpers import load_benchmark

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels are checked in the interpreter


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_tiny_run_measures_every_part(gpu_check, tmp_path, capsys):
    report_path, table_path = tmp_path / "gpu.json", tmp_path / "gpu.md"
    # The image encoders (seconds even at toy size on CPU) and the checks run in the slow test below.
    code = gpu_check.main(["--tiny", "--device", "cpu", "--skip", "checks", "sam", "--batches", "1", "--prefill-lengths", "32",
                           "--new-tokens", "3", "--json", str(report_path), "--markdown", str(table_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["device"].startswith("CPU") and report["settings"]["tiny"] is True
    decode = report["decode"][0]
    assert decode["batch"] == 1
    for name in ("BASED (eager)", "Transformer++ (eager)"):
        assert decode[name]["tokens_per_s"] > 0 and decode[name]["seconds"] > 0
    assert report["prefill"][0]["tokens"] == 32 and report["prefill"][0]["BASED"]["seconds"] > 0
    # Parameter counts of the pair match (the Transformer++ MLP width is chosen for that).
    based, transformer = report["parameters"]["BASED"], report["parameters"]["Transformer++"]
    assert abs(based - transformer) / based < 0.05
    if importlib.util.find_spec("triton") is not None:
        assert {row["op"].split()[0] for row in report["ops"]} == {"bi_wkv", "linear_attention_step"}
    table = table_path.read_text()
    for heading in ("(a) Decode", "(b) Prefill", "Kernels vs their torch forms" if report["ops"] else "(b) Prefill"):
        assert heading in table
    assert "decode batch 1" in capsys.readouterr().out


def test_time_budget_skips_instead_of_overrunning(gpu_check, tmp_path):
    report_path = tmp_path / "gpu.json"
    code = gpu_check.main(["--tiny", "--device", "cpu", "--skip", "checks", "ops", "--budget-s", "0", "--batches", "1",
                           "--prefill-lengths", "32", "--json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["decode"][0]["BASED (eager)"] == {"skipped": "time budget"}
    assert report["prefill"][0]["Transformer++"] == {"skipped": "time budget"}
    assert report["sam"][0]["RWKV-SAM"] == {"skipped": "time budget"}


@pytest.mark.slow
def test_tiny_run_with_checks_and_encoders_passes(gpu_check, tmp_path):
    """The correctness part: every GPU path (the Triton kernels in the interpreter, FlexAttention
    eager, the graph decoder's eager fallback) against its reference; the script exits 1 on a failure."""
    report_path = tmp_path / "gpu.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["sam"][0]["RWKV-SAM"]["images_per_s"] > 0 and report["sam"][0]["attention"]["images_per_s"] > 0
    checks = report["checks"]
    assert checks and not [c for c in checks if c["passed"] is False]
    names = {c["check"] for c in checks}
    assert {"linear attention prefill", "sliding-window prefill (FlexAttention)", "BASED forward"} <= names
    if importlib.util.find_spec("triton") is not None:
        assert {"Taylor decode step (Triton)", "Bi-WKV forward (Triton)", "Bi-WKV gradients (Triton fwd + torch bwd)"} <= names


def test_a_failed_check_fails_the_run(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_checks", lambda device, tiny: [
        {"check": "planted", "dtype": "float32", "rms_rel_error": 1.0, "tolerance": 1e-4, "passed": False, "note": ""}])
    assert gpu_check.main(["--tiny", "--device", "cpu", "--skip", "decode", "prefill", "sam", "ops"]) == 1

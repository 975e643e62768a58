"""benchmarks/sam_encoder_gpu.py runs end to end on CPU at toy sizes (the GPU run is a device check)."""

import json

import pytest
import torch

from helpers import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; on a GPU the script is the device check itself")
def test_tiny_run_writes_its_rows(tmp_path, capsys):
    bench = load_benchmark("sam_encoder_gpu")
    assert bench.main(["--tiny", "--repeats", "1", "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    (row,) = report["rows"]
    assert row["size"] == 64 and row["RWKV-SAM eager"] > 0 and row["attention eager"] > 0
    assert "| 64 px | 1 |" in capsys.readouterr().out

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
    assert row["size"] == 64
    assert all(row[f"{label} eager"] > 0 for label in ("RWKV-SAM", "attention", "Mamba", "Mamba-bi"))
    out = capsys.readouterr().out
    table_row = next(line for line in out.splitlines() if line.startswith("| 64 px | 1 |"))
    # images/s of each encoder (batch / seconds), then each linear-time encoder's speed over attention's
    cells = [cell.strip() for cell in table_row.strip("|").split("|")]
    speeds = {label: 1.0 / row[f"{label} eager"] for label in ("RWKV-SAM", "attention", "Mamba", "Mamba-bi")}
    assert cells[2:6] == [f"{speeds[label]:.1f}" for label in ("RWKV-SAM", "attention", "Mamba", "Mamba-bi")]
    assert f"**{row['attention eager'] / row['Mamba eager']:.2f}x**" in cells

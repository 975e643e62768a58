"""Shared test helpers: RMS-relative error bounds with per-dtype tolerances, and loading a benchmark script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from linmix.utils.testing import max_relative_error, rms_relative_error  # noqa: F401  (re-exported for the tests)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# RMS-relative tolerances by the dtype the fast path ran in (the reference runs in fp64/fp32).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def assert_close_rms(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str = "") -> None:
    error = rms_relative_error(actual, expected)
    assert error <= tolerance, f"{what} rms-relative error {error:.3e} > {tolerance:.1e}"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in sys.modules, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""linmix.utils.testing: the error measures tests and benchmarks share, on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from linmix.utils.testing import max_relative_error, rms_relative_error


def test_rms_relative_error_by_hand():
    expected = torch.tensor([3.0, -4.0])  # rms = sqrt((9 + 16) / 2) = 5 / sqrt(2)
    actual = torch.tensor([3.0, -3.0])  # difference rms = sqrt(1 / 2)
    assert rms_relative_error(actual, expected) == pytest.approx(0.2, rel=1e-15)
    assert rms_relative_error(expected, expected) == 0.0
    # Computed in fp64 whatever the inputs' dtype: bf16 inputs give their own rounding error exactly.
    assert rms_relative_error(torch.tensor([1.0, 1.0], dtype=torch.bfloat16), torch.tensor([1.0, 1.0 + 2**-20], dtype=torch.float64)) == (
        pytest.approx(math.sqrt((2**-20) ** 2 / 2) / math.sqrt((1 + (1 + 2**-20) ** 2) / 2), rel=1e-12)
    )
    # An all-zero reference: the floor keeps the result finite (and huge) instead of dividing by zero.
    assert rms_relative_error(torch.tensor([1e-40]), torch.zeros(1)) == pytest.approx(1e-10)
    assert rms_relative_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_max_relative_error_by_hand():
    expected = torch.tensor([[2.0, -8.0], [0.5, 1.0]])
    actual = torch.tensor([[2.5, -8.0], [0.5, 0.0]])  # worst element: |1 - 0| = 1, scale max |expected| = 8
    assert max_relative_error(actual, expected) == pytest.approx(1 / 8, rel=1e-15)


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1\) and \(2,\)"):
        rms_relative_error(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        max_relative_error(torch.zeros(3), torch.zeros(1))

"""RWKV5TimeMix: the causal mixer contract (steps equal the forward, padding, state size) and errors.
The recurrence op itself is tested in tests/ops/test_rwkv5_recurrence.py."""

import pytest
import torch

from gradient_checks import assert_gradients_match_finite_differences
from mixer_contract import contract_tests
import linmix.layers.rwkv5 as rwkv5_layer_module
from linmix.layers.rwkv5 import RWKV5TimeMix
from linmix.ops.rwkv5 import rwkv5_recurrence, rwkv5_recurrence_reference

LAYERS = {
    "one_head": lambda: RWKV5TimeMix(16, chunk_size=8),
    "four_heads_small_chunks": lambda: RWKV5TimeMix(24, num_heads=4, layer_id=1, num_layers=2, chunk_size=5),
}


def test_the_recurrence_ops_are_re_exported_from_the_layer_module():
    """The recurrence lives in linmix.ops.rwkv5 (tested in tests/ops); the old import path still works."""
    assert rwkv5_layer_module.rwkv5_recurrence is rwkv5_recurrence
    assert rwkv5_layer_module.rwkv5_recurrence_reference is rwkv5_recurrence_reference


TestMixerContract = contract_tests(LAYERS)


def test_state_size_is_the_matrix_valued_accounting():
    assert RWKV5TimeMix(64, num_heads=4).state_size_bytes(1024) == 4 * 4 * 16 * 16
    assert RWKV5TimeMix(64).state_size_bytes(10) == 4 * 64 * 64


def test_backward_is_finite_and_errors_are_clear():
    layer = RWKV5TimeMix(12, num_heads=3, chunk_size=4)
    x = torch.randn(2, 11, 12, requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # The gradients are the loss's derivatives: fp32 autograd against fp64 finite differences.
    assert_gradients_match_finite_differences(layer, lambda module, inputs: module(inputs).square().mean(), x.detach())
    with pytest.raises(ValueError, match="divisible"):
        RWKV5TimeMix(10, num_heads=3)
    with pytest.raises(ValueError, match="RWKV5State"):
        layer.step(torch.randn(2, 12), layer.init_state(3))

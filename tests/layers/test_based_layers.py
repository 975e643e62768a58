import math

import pytest
import torch

from gradient_checks import assert_gradients_match_finite_differences
from helpers import TOLERANCE, assert_close_rms
from mixer_contract import contract_tests
from linmix.layers.base_conv import BaseConv
from linmix.layers.linear_attention import BasedLinearAttention
from linmix.layers.mlp import GatedMLP
from linmix.layers.norm import RMSNorm
from linmix.ops.linear_attention import linear_attention_reference
from linmix.ops.short_conv import short_conv_reference


def _linear_attention(**kwargs):
    return BasedLinearAttention(36, feature_dim=6, num_heads=3, chunk_size=8, **kwargs)


LAYERS = {
    "linear_attention": _linear_attention,
    "linear_attention_full_map": lambda: _linear_attention(symmetric=False),
    "base_conv": lambda: BaseConv(20, kernel_size=3),
    "base_conv_k4": lambda: BaseConv(20, kernel_size=4),
}


TestMixerContract = contract_tests(LAYERS)


def test_linear_attention_layer_matches_explicit_formula():
    layer = _linear_attention().double()
    x = torch.randn(2, 19, 36, dtype=torch.float64)
    q = layer.proj_q(x).view(2, 19, 3, 6)
    k = layer.proj_k(x).view(2, 19, 3, 6)
    v = layer.proj_v(x).view(2, 19, 3, 12)
    s = torch.einsum("bihf,bjhf->bhij", q, k) / math.sqrt(6)
    weights = (1 + s + s * s / 2) * torch.ones(19, 19, dtype=torch.bool).tril()
    y = torch.einsum("bhij,bjhd->bihd", weights, v) / (weights.sum(-1).transpose(1, 2)[..., None] + 1e-12)
    expected = layer.out_proj(y.reshape(2, 19, 36))
    torch.testing.assert_close(layer(x), expected)


def test_linear_attention_input_dim_scaling():
    layer = _linear_attention(feature_map_input_dim=24).double()
    x = torch.randn(1, 9, 36, dtype=torch.float64)
    q = layer.proj_q(x).view(1, 9, 3, 6)
    k = layer.proj_k(x).view(1, 9, 3, 6)
    v = layer.proj_v(x).view(1, 9, 3, 12)
    from linmix.ops.feature_maps import taylor_feature_map

    y = linear_attention_reference(q, k, v, feature_map=lambda t: taylor_feature_map(t, input_dim=24))
    torch.testing.assert_close(layer(x), layer.out_proj(y.reshape(1, 9, 36)))


def test_linear_attention_state_bytes_and_shapes():
    layer = BasedLinearAttention(1024, feature_dim=16, num_heads=16)
    assert layer.expanded_dim == 153
    assert layer.state_size_bytes(2048) == 4 * (16 * 64 * 153 + 16 * 153)
    state = layer.init_state(3)
    assert state.kv.shape == (3, 16, 153, 64) and state.kv.dtype == torch.float32
    assert state.nbytes() == 3 * layer.state_size_bytes(1)
    assert layer.state_size_bytes(1) == layer.state_size_bytes(100_000)  # constant in length


def test_base_conv_matches_explicit_formula():
    layer = BaseConv(8).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    u1, u2 = layer.in_proj(x).chunk(2, -1)
    conv = short_conv_reference(u1, layer.conv.conv.weight[:, 0])
    torch.testing.assert_close(layer(x), layer.out_proj(torch.nn.functional.silu(conv) * u2))
    assert layer.conv.conv.weight.shape == (16, 1, 3)  # official key layout conv.conv.weight [2d, 1, 3]
    assert layer.state_size_bytes(5) == 4 * 16 * 3


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bf16_forward_close_to_fp32(name):
    layer = LAYERS[name]()
    x = torch.randn(2, 25, layer.d_model)
    with torch.no_grad():
        expected = layer(x)
        got = layer.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close_rms(got, expected, 3e-2)


def test_gradients_flow_to_every_parameter():
    for name, make in LAYERS.items():
        layer = make()
        layer(torch.randn(2, 13, layer.d_model)).pow(2).mean().backward()
        for pname, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}.{pname}"
        # and they are the loss's derivatives: fp32 autograd against fp64 finite differences
        assert_gradients_match_finite_differences(layer, lambda module, x: module(x).pow(2).mean(),
                                                  torch.randn(2, 13, layer.d_model), what=name)


def test_rmsnorm_and_gated_mlp():
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16

    mlp = GatedMLP(8).double()
    assert mlp.fc1.weight.shape == (32, 8) and mlp.fc2.weight.shape == (8, 16) and mlp.fc1.bias is None
    value, gate = mlp.fc1(x.new_ones(2, 8)).chunk(2, -1)
    torch.testing.assert_close(mlp(x.new_ones(2, 8)), mlp.fc2(value * torch.nn.functional.silu(gate)))
    assert GatedMLP(1024, 2730, multiple_of=256).hidden_features == 2816


def test_bad_inputs_name_expected_shapes():
    layer = _linear_attention()
    with pytest.raises(ValueError, match=r"\[B, T, 36\]"):
        layer(torch.randn(2, 5, 35))
    with pytest.raises(ValueError, match=r"\[B, T, 36\]"):
        layer(torch.randn(5, 36))
    with pytest.raises(ValueError, match=r"floating-point"):
        layer(torch.ones(2, 5, 36, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 36\]"):
        layer.step(torch.randn(2, 1, 36), layer.init_state(2))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\]"):
        layer(torch.randn(2, 5, 36), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        BasedLinearAttention(30, num_heads=16)
    with pytest.raises(ValueError, match=r"\[B, T, 20\]"):
        BaseConv(20)(torch.randn(1, 3, 21))
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\]"):
        RMSNorm(6)(torch.randn(2, 5))

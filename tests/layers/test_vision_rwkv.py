"""Vision-RWKV layers (linmix.layers.vision_rwkv): spatial mix and block against a direct fp64
formula (built from the ops' oracles), the fancy init, defaults, stochastic depth and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCE, assert_close_rms
from linmix.layers import DropPath, VRWKVBlock, VRWKVChannelMix, VRWKVSpatialMix
from linmix.ops.q_shift import q_shift_reference as q_shift
from linmix.ops.wkv import bi_wkv_reference


# --------------------------------------------------------------------------------------------------
# Vision-RWKV block against a direct fp64 implementation


def _randomize_(module):
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("spatial_decay"):
                parameter.copy_(4 * torch.randn_like(parameter))  # negative decays included
            elif "spatial_mix" in name:
                parameter.uniform_(0, 1)
            else:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return module


def _direct_spatial_mix(att, x, height, width):
    shifted = q_shift(x, height, width)
    mixed = {name: x * getattr(att, f"spatial_mix_{name}") + shifted * (1 - getattr(att, f"spatial_mix_{name}")) for name in "kvr"}
    k = mixed["k"] @ att.key.weight.T
    v = mixed["v"] @ att.value.weight.T
    r = mixed["r"] @ att.receptance.weight.T
    length = height * width
    wkv = bi_wkv_reference(att.spatial_decay / length, att.spatial_first / length, k, v)
    return (torch.sigmoid(r) * wkv) @ att.output.weight.T


def _direct_channel_mix(ffn, x, height, width):
    shifted = q_shift(x, height, width)
    x_k = x * ffn.spatial_mix_k + shifted * (1 - ffn.spatial_mix_k)
    x_r = x * ffn.spatial_mix_r + shifted * (1 - ffn.spatial_mix_r)
    hidden = torch.relu(x_k @ ffn.key.weight.T) ** 2
    return torch.sigmoid(x_r @ ffn.receptance.weight.T) * (hidden @ ffn.value.weight.T)


@pytest.mark.parametrize("height, width", [(3, 5), (8, 8)])
def test_spatial_mix_matches_direct_formula_fp64(height, width):
    att = _randomize_(VRWKVSpatialMix(12, layer_id=3, depth=14)).double()
    x = torch.randn(2, height * width, 12, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rms(att(x, height, width), _direct_spatial_mix(att, x, height, width), TOLERANCE[torch.float64], "spatial mix")


def test_block_matches_direct_formula_fp64_and_fp32():
    height, width, dim = 4, 6, 16
    block = _randomize_(VRWKVBlock(dim, layer_id=5, depth=14))
    x = torch.randn(2, height * width, dim, dtype=torch.float64)

    def direct(block, x):
        ln = lambda norm, t: F.layer_norm(t, (dim,), norm.weight, norm.bias, 1e-6)  # noqa: E731
        x = x + block.gamma1 * _direct_spatial_mix(block.att, ln(block.ln1, x), height, width)
        return x + block.gamma2 * _direct_channel_mix(block.ffn, ln(block.ln2, x), height, width)

    with torch.no_grad():
        expected = direct(block.double(), x)
        assert_close_rms(block(x, height, width), expected, TOLERANCE[torch.float64], "block fp64")
        block.float()
        assert_close_rms(block(x.float(), height, width), expected, TOLERANCE[torch.float32], "block fp32")


def test_block_norms_and_layer_scale_defaults():
    block = VRWKVBlock(8, 0, 14)
    assert block.ln1.eps == 1e-6 and block.ln2.eps == 1e-6
    assert torch.equal(block.gamma1, torch.full((8,), 1e-2)) and torch.equal(block.gamma2, torch.full((8,), 1e-2))
    assert block.ffn.key.weight.shape == (16, 8) and block.ffn.value.weight.shape == (8, 16)
    for linear in (block.att.key, block.att.value, block.att.receptance, block.att.output, block.ffn.key, block.ffn.value, block.ffn.receptance):
        assert linear.bias is None


def test_fancy_init_matches_the_formulas():
    dim, layer, depth = 384, 3, 14
    block = VRWKVBlock(dim, layer, depth)
    r0, r1 = layer / (depth - 1), 1 - layer / depth
    att, ffn = block.att, block.ffn
    for c in (0, 1, 2, 100, 383):
        assert att.spatial_decay[c].item() == pytest.approx(-5 + 8 * (c / (dim - 1)) ** (0.7 + 1.3 * r0), abs=1e-6)
        assert att.spatial_first[c].item() == pytest.approx(math.log(0.3) + 0.5 * ((c + 1) % 3 - 1), abs=1e-6)
        x = c / dim
        assert att.spatial_mix_k[c].item() == pytest.approx(x**r1, abs=1e-6)
        assert att.spatial_mix_v[c].item() == pytest.approx(x**r1 + 0.3 * r0, abs=1e-6)
        assert att.spatial_mix_r[c].item() == pytest.approx(x ** (0.5 * r1), abs=1e-6)
        assert ffn.spatial_mix_k[c].item() == pytest.approx(x**r1, abs=1e-6)
        assert ffn.spatial_mix_r[c].item() == pytest.approx(x**r1, abs=1e-6)
    assert att.spatial_decay[0].item() == pytest.approx(-5.0) and att.spatial_decay[-1].item() == pytest.approx(3.0)
    # The first layer: r0 = 0, r1 = 1.
    first = VRWKVSpatialMix(dim, 0, depth)
    assert first.spatial_mix_v[100].item() == pytest.approx(100 / dim, abs=1e-6)
    assert first.spatial_decay[100].item() == pytest.approx(-5 + 8 * (100 / (dim - 1)) ** 0.7, abs=1e-6)


def test_channel_mix_matches_direct_formula_fp64():
    ffn = _randomize_(VRWKVChannelMix(12, layer_id=2, depth=5, hidden_ratio=3)).double()
    x = torch.randn(2, 3 * 5, 12, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rms(ffn(x, 3, 5), _direct_channel_mix(ffn, x, 3, 5), TOLERANCE[torch.float64], "channel mix")


@pytest.mark.parametrize("height, width, dim", [(1, 9, 10), (7, 1, 10), (3, 5, 13)])
def test_block_gradients_match_the_direct_formula(height, width, dim):
    """Training takes the torch path: gradients of input and parameters equal the fp64 formula's."""
    block = _randomize_(VRWKVBlock(dim, layer_id=1, depth=3)).double()
    x = torch.randn(2, height * width, dim, dtype=torch.float64, requires_grad=True)

    def direct(x):
        ln = lambda norm, t: F.layer_norm(t, (dim,), norm.weight, norm.bias, 1e-6)  # noqa: E731
        x = x + block.gamma1 * _direct_spatial_mix(block.att, ln(block.ln1, x), height, width)
        return x + block.gamma2 * _direct_channel_mix(block.ffn, ln(block.ln2, x), height, width)

    weight = torch.randn(2, height * width, dim, dtype=torch.float64)
    wanted = [x, *block.parameters()]
    grads = torch.autograd.grad((block(x, height, width) * weight).sum(), wanted)
    expected = torch.autograd.grad((direct(x) * weight).sum(), wanted)
    for grad, reference in zip(grads, expected):
        assert_close_rms(grad, reference, 1e-8, "gradient")


def test_parameter_names_are_the_official_checkpoint_keys():
    assert sorted(VRWKVBlock(8, 0, 2).state_dict()) == [
        "att.key.weight", "att.output.weight", "att.receptance.weight", "att.spatial_decay", "att.spatial_first",
        "att.spatial_mix_k", "att.spatial_mix_r", "att.spatial_mix_v", "att.value.weight",
        "ffn.key.weight", "ffn.receptance.weight", "ffn.spatial_mix_k", "ffn.spatial_mix_r", "ffn.value.weight",
        "gamma1", "gamma2", "ln1.bias", "ln1.weight", "ln2.bias", "ln2.weight",
    ]


def test_drop_path_zeroes_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    y = drop(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # dropped, or kept and scaled by 1 / (1 - p)
    assert 0 < int((per_sample == 0).all(1).sum()) < 64
    assert torch.equal(drop.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_errors_name_what_was_expected():
    block = VRWKVBlock(8, 0, 2)
    with pytest.raises(ValueError, match=r"T = height \* width = 3 \* 3 = 9 and C = 8"):
        block.att(torch.randn(1, 8, 8), 3, 3)
    with pytest.raises(ValueError, match="C = 8"):
        block.ffn(torch.randn(1, 9, 6), 3, 3)
    with pytest.raises(ValueError, match=r"layer_id must be an integer in \[0, depth\)"):
        VRWKVSpatialMix(8, layer_id=2, depth=2)
    with pytest.raises(ValueError, match="hidden_ratio"):
        VRWKVChannelMix(8, hidden_ratio=0)

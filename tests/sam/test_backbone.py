"""RWKV-SAM backbone: Q-shift, the Vision-RWKV block against a direct fp64 formula, the fancy init,
every variant forward/backward, input validation and the spec's parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCE, assert_close_rms
from linmix.ops.wkv import bi_wkv_reference
from linmix.sam.backbone import (
    BACKBONE_VARIANTS,
    TOKEN_MIXERS,
    LayerNorm2d,
    Neck,
    RwkvSamBackbone,
    RwkvSamImageEncoder,
    VRWKVBlock,
    VRWKVSpatialMix,
    q_shift,
)


# --------------------------------------------------------------------------------------------------
# Q-shift


def _grid_tokens(height, width, channels):
    """x[0, h * width + w, c] = 100 c + 10 h + w + 1: every value distinct and nonzero."""
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[None, :, None]
    c = torch.arange(channels)[None, None, :]
    return (100 * c + 10 * h + w + 1).double().reshape(1, height * width, channels)


def test_q_shift_moves_each_group_in_its_direction():
    height, width, channels = 3, 4, 9  # g = 2; channel 8 passes through
    x = _grid_tokens(height, width, channels)
    y = q_shift(x, height, width).reshape(height, width, channels)

    def value(h, w, c):
        return 100 * c + 10 * h + w + 1

    # Spot values by hand at the centre-ish token (h=1, w=2).
    assert y[1, 2, 0] == value(1, 1, 0)  # left neighbour
    assert y[1, 2, 3] == value(1, 3, 3)  # right neighbour
    assert y[1, 2, 4] == value(0, 2, 4)  # above
    assert y[1, 2, 7] == value(2, 2, 7)  # below
    assert y[1, 2, 8] == value(1, 2, 8)  # pass-through

    # Every element, with zero padding at the borders.
    offsets = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}
    for h in range(height):
        for w in range(width):
            for c in range(channels):
                group = c // 2
                dh, dw = offsets.get(group, (0, 0))
                hh, ww = h + dh, w + dw
                expected = value(hh, ww, c) if 0 <= hh < height and 0 <= ww < width else 0
                assert y[h, w, c] == expected, (h, w, c)
    assert (y[:, 0, 0:2] == 0).all() and (y[:, -1, 2:4] == 0).all()
    assert (y[0, :, 4:6] == 0).all() and (y[-1, :, 6:8] == 0).all()


def test_q_shift_single_row_and_column_and_bad_shape():
    x = torch.randn(2, 5, 8)
    row = q_shift(x, 1, 5)  # no neighbour above or below
    assert (row[..., 4:] == 0).all()
    assert torch.equal(row[:, 1:, :2], x[:, :-1, :2])
    column = q_shift(x, 5, 1)  # no neighbour left or right
    assert (column[..., :4] == 0).all()
    assert torch.equal(column[:, 1:, 4:6], x[:, :-1, 4:6])
    with pytest.raises(ValueError, match="height \\* width"):
        q_shift(x, 2, 3)


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


# --------------------------------------------------------------------------------------------------
# norms and neck


def test_layer_norm_2d_is_sams_formula():
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 3)
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).pow(2).mean(1, keepdim=True)
    expected = norm.weight[:, None, None] * (x - mean) / torch.sqrt(variance + 1e-6) + norm.bias[:, None, None]
    assert_close_rms(norm(x), expected, 1e-6, "LayerNorm2d")


def test_neck_keys_match_sams_layout():
    neck = Neck(384)
    assert sorted(neck.state_dict()) == ["0.weight", "1.bias", "1.weight", "2.weight", "3.bias", "3.weight"]
    assert neck[0].weight.shape == (256, 384, 1, 1) and neck[2].weight.shape == (256, 256, 3, 3)


# --------------------------------------------------------------------------------------------------
# whole backbone and encoder


def _forward_backward(variant, token_mixer):
    encoder = RwkvSamImageEncoder(variant, token_mixer)
    c1, c2, d = encoder.backbone.stage_channels
    x = torch.randn(1, 3, 64, 48)
    out = encoder(x)
    assert out.embedding.shape == (1, 256, 4, 3)
    assert out.stage1.shape == (1, c1, 16, 12)
    assert out.stage2.shape == (1, c2, 8, 6)
    (out.embedding.square().mean() + out.stage1.mean() + out.stage2.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    features = encoder.backbone(x)
    assert features.tokens.shape == (1, d, 4, 3)


@pytest.mark.parametrize("token_mixer", TOKEN_MIXERS)
@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_every_small_variant_forward_backward(variant, token_mixer):
    _forward_backward(variant, token_mixer)


@pytest.mark.slow
@pytest.mark.parametrize("token_mixer", TOKEN_MIXERS)
@pytest.mark.parametrize("variant", ["base", "large"])
def test_every_large_variant_forward_backward(variant, token_mixer):
    _forward_backward(variant, token_mixer)


def test_gradient_checkpointing_gives_the_same_result():
    backbone = RwkvSamBackbone("tiny")
    x = torch.randn(1, 3, 32, 48)
    plain = backbone(x).tokens
    backbone.gradient_checkpointing = True
    checkpointed = backbone(x).tokens
    torch.testing.assert_close(checkpointed, plain)
    checkpointed.sum().backward()


@pytest.mark.parametrize("shape", [(1, 3, 72, 64), (1, 3, 64, 40), (1, 3, 0, 64)])
def test_input_not_divisible_by_16_raises(shape):
    backbone = RwkvSamBackbone("tiny")
    with pytest.raises(ValueError, match="multiples of 16"):
        backbone(torch.randn(shape))


def test_bad_input_channels_and_names_raise():
    backbone = RwkvSamBackbone("tiny")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        backbone(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        backbone(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="variant"):
        RwkvSamBackbone("huge")
    with pytest.raises(ValueError, match="token_mixer"):
        RwkvSamBackbone("tiny", "lstm")


# Exact counts (small): conv part 1,077,184 (stem 38,848; stage 1 71,552; stage 2 523,776; strided
# conv 443,008) + 14 blocks + final norm 768. RWKV block 1,332,096 = 9 C^2 + 13 C (C = 384);
# attention block 1,480,320 = 10 C^2 + 15 C (qkv/proj/GeGLU biases, 2 norms, 2 layer scales).
EXPECTED_SMALL = {"rwkv": 19_727_296, "attention": 21_802_432}
SPEC_SMALL = {"rwkv": 19.7e6, "attention": 21.8e6}


@pytest.mark.parametrize("token_mixer", sorted(SPEC_SMALL))  # the Mamba mixers: tests/sam/test_backbone_mamba.py
def test_small_parameter_counts_match_the_spec(token_mixer):
    with torch.device("meta"):
        backbone = RwkvSamBackbone("small", token_mixer)
    count = sum(p.numel() for p in backbone.parameters())
    assert abs(count - SPEC_SMALL[token_mixer]) / SPEC_SMALL[token_mixer] < 0.02
    assert count == EXPECTED_SMALL[token_mixer]


def test_variant_widths():
    assert {name: (v.stem_width, v.stage1_width, v.stage2_width, v.token_width) for name, v in BACKBONE_VARIANTS.items()} == {
        "tiny": (32, 32, 64, 192),
        "small": (64, 64, 128, 384),
        "base": (128, 128, 256, 768),
        "large": (160, 160, 320, 1024),
    }
    with torch.device("meta"):
        encoder = RwkvSamImageEncoder("small")
    neck = sum(p.numel() for p in encoder.neck.parameters())
    assert neck == 384 * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256


# --------------------------------------------------------------------------------------------------
# conv + GELU fused for CPU inference


@pytest.mark.parametrize(
    "conv, channels_last",
    [
        (torch.nn.Conv2d(16, 64, 1), False),  # MBConv expand
        (torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), True),  # depthwise, strided
        (torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), True),
    ],
)
def test_conv2d_gelu_fused_equals_conv_then_gelu(conv, channels_last):
    from linmix.sam.common import _can_fuse, conv2d_gelu

    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 33, 20)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _can_fuse(x, conv) == torch.backends.mkldnn.is_available()
        torch.testing.assert_close(conv2d_gelu(x, conv), F.gelu(conv(x)), rtol=1e-5, atol=1e-6)
    # With gradients the plain two-op form runs, so training is unchanged.
    assert not _can_fuse(x.requires_grad_(), conv)
    conv2d_gelu(x, conv).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_encoder_inference_with_fused_convs_equals_the_plain_form(monkeypatch):
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("tiny", "rwkv").eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fused = encoder(image)
        monkeypatch.setattr("linmix.sam.common._FUSED_CONV", None)
        plain = encoder(image)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backbone_gradients_stay_finite_on_a_zero_padded_frame():
    """SAM pads frames with zeros; with a zero first-conv bias the stem's LayerNorm2d saw constant
    channels there and the backbone's gradients overflowed to inf (checked: they do with the bias
    zeroed). The stem's init prevents it."""
    torch.manual_seed(0)
    backbone = RwkvSamBackbone("tiny")
    assert backbone.stem.conv1.bias.abs().max() > 0
    frame = torch.zeros(1, 3, 128, 128)
    frame[:, :, :80, :48] = torch.randn(1, 3, 80, 48)  # the image in the corner, zeros elsewhere
    backbone(frame).tokens.square().mean().backward()
    norms = torch.stack([p.grad.norm() for p in backbone.parameters() if p.grad is not None])
    assert torch.isfinite(norms).all()
    assert norms.max() < 1e3

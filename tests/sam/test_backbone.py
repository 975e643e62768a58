"""RWKV-SAM backbone: block construction per token mixer, norms and neck, every variant
forward/backward, input validation, the spec's parameter counts and the fused conv + GELU. The
Vision-RWKV layers are tested in tests/layers/test_vision_rwkv.py, Q-shift in tests/ops/test_q_shift.py."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rms
from linmix.sam.backbone import (
    BACKBONE_VARIANTS,
    TOKEN_BLOCK_BUILDERS,
    TOKEN_MIXERS,
    AttentionBlock,
    LayerNorm2d,
    Neck,
    RwkvSamBackbone,
    RwkvSamImageEncoder,
    VRWKVBlock,
)


# --------------------------------------------------------------------------------------------------
# the token blocks are layers (tested in tests/layers/test_vision_rwkv.py); the backbone composes them


def test_backbone_re_exports_the_moved_names():
    import linmix.layers as layers
    import linmix.ops as ops
    import linmix.sam.backbone as backbone

    assert backbone.VRWKVBlock is layers.VRWKVBlock and backbone.VRWKVSpatialMix is layers.VRWKVSpatialMix
    assert backbone.VRWKVChannelMix is layers.VRWKVChannelMix and backbone.DropPath is layers.DropPath
    assert backbone.q_shift is ops.q_shift and backbone.shifted_mixes is ops.shifted_mixes


@pytest.mark.parametrize("token_mixer, block_type", [("rwkv", VRWKVBlock), ("attention", AttentionBlock)])
def test_each_token_mixer_builds_its_blocks_with_rising_drop_path(token_mixer, block_type):
    assert TOKEN_MIXERS == tuple(TOKEN_BLOCK_BUILDERS)
    with torch.device("meta"):
        backbone = RwkvSamBackbone("tiny", token_mixer, drop_path_rate=0.13, mlp_ratio=3, layer_scale_init=0.5)
    assert len(backbone.blocks) == 14 and all(type(block) is block_type for block in backbone.blocks)
    rates = [block.drop_path.p for block in backbone.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.13) and rates == sorted(rates)
    assert all(block.gamma1.shape == (192,) for block in backbone.blocks)
    hidden = backbone.blocks[0].ffn.key.weight.shape[0] if token_mixer == "rwkv" else backbone.blocks[0].ffn.w0.weight.shape[0]
    assert hidden == 3 * 192


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
        monkeypatch.setattr("linmix.sam.common._FUSED_CONV_AVAILABLE", False)
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

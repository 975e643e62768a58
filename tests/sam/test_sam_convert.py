"""Loading Segment Anything checkpoints, and SAM's ViT image encoder (the distillation teacher).

The SAM-format checkpoints here are built by hand from the key list and shapes of the official
layout (spec/RWKV-SAM.md section 7), never by saving a linmix model: a tiny ViT (img 64, patch 16,
width 32, depth 2, 2 heads, window 2, global block 1) plus the full-size prompt encoder and mask
decoder. The ViT attention is checked against the SAM formulas written out with plain loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gradient_checks import assert_gradients_match_finite_differences
from helpers import TOLERANCE, assert_close_rms
from sam_checkpoint_keys import sam_image_encoder_shapes, sam_mask_decoder_shapes, sam_prompt_encoder_shapes

from linmix.sam.convert import (
    build_sam_vit_teacher,
    infer_vit_config,
    load_sam_checkpoint,
    load_sam_image_encoder,
    load_sam_prompt_decoder,
    vit_variant_name,
)
from linmix.sam.image_encoder_vit import (
    VIT_CONFIGS,
    ImageEncoderViT,
    ViTBlock,
    build_vit,
    window_partition,
    window_unpartition,
)
from linmix.sam.mask_decoder import MaskDecoder
from linmix.sam.prompt_encoder import PromptEncoder

TINY_VIT = {"img_size": 64, "patch": 16, "width": 32, "depth": 2, "heads": 2, "window": 2, "global": (1,)}


# ---------------------------------------------------------------------------------------------
# SAM's key layout, written from the spec (names and shapes), independent of linmix's modules


def tiny_sam_state_dict():
    t = TINY_VIT
    shapes = {
        **sam_image_encoder_shapes(t["img_size"], t["patch"], t["width"], t["depth"], t["heads"], t["window"], t["global"]),
        **sam_prompt_encoder_shapes(),
        **sam_mask_decoder_shapes(),
    }
    generator = torch.Generator().manual_seed(7)
    return {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    state_dict = tiny_sam_state_dict()
    path = tmp_path / "sam_tiny.pth"
    torch.save(state_dict, path)
    return path, state_dict


# ---------------------------------------------------------------------------------------------
# Key layout


def test_released_sizes_have_sams_keys_and_shapes():
    """linmix's vit_b/l/h, prompt encoder and decoder state dicts equal the spec's key list exactly."""
    decoder_shapes = {**sam_prompt_encoder_shapes(), **sam_mask_decoder_shapes()}
    with torch.device("meta"):
        ours = {"prompt_encoder." + k: tuple(v.shape) for k, v in PromptEncoder().state_dict().items()}
        ours.update({"mask_decoder." + k: tuple(v.shape) for k, v in MaskDecoder(hq_fusion=False).state_dict().items()})
    assert ours == decoder_shapes
    assert (len(sam_prompt_encoder_shapes()), len(sam_mask_decoder_shapes())) == (17, 120)
    for name, config in VIT_CONFIGS.items():
        expected = sam_image_encoder_shapes(
            1024, 16, config["embed_dim"], config["depth"], config["num_heads"], 14, config["global_attn_indexes"]
        )
        with torch.device("meta"):
            encoder = build_vit(name)
        assert {"image_encoder." + k: tuple(v.shape) for k, v in encoder.state_dict().items()} == expected, name
        if name == "vit_b":
            assert len(expected) + len(decoder_shapes) == 314
        # The size is recovered from the shapes alone.
        meta_state = {k: torch.empty(s, device="meta") for k, s in expected.items()}
        inferred = infer_vit_config(meta_state)
        assert vit_variant_name(inferred) == name
        assert inferred["img_size"] == 1024 and inferred["window_size"] == 14 and inferred["mlp_ratio"] == 4.0
        assert inferred["global_attn_indexes"] == config["global_attn_indexes"]


# ---------------------------------------------------------------------------------------------
# Loading a SAM-format checkpoint


def test_tiny_checkpoint_every_key_consumed(tiny_checkpoint):
    path, state_dict = tiny_checkpoint
    loaded = load_sam_checkpoint(path)
    assert loaded.keys() == state_dict.keys()

    teacher = build_sam_vit_teacher(path)
    assert teacher.variant == "custom"
    assert (teacher.img_size, teacher.embed_dim, len(teacher.blocks), teacher.num_heads) == (64, 32, 2, 2)
    assert (teacher.window_size, teacher.global_attn_indexes) == (2, (1,))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, state_dict["image_encoder." + name], rtol=0, atol=0)
    with torch.no_grad():
        embedding = teacher(torch.randn(2, 3, 64, 64))
    assert embedding.shape == (2, 256, 4, 4) and torch.isfinite(embedding).all()

    prompt_encoder = PromptEncoder()
    mask_decoder = MaskDecoder(hq_fusion=True)
    hq_before = {k: v.clone() for k, v in mask_decoder.state_dict().items() if k.startswith("hq_")}
    report = load_sam_prompt_decoder(prompt_encoder, mask_decoder, loaded)
    assert len(report.consumed) == 17 + 120
    assert len(report.kept_at_init) == 18 and all(k.startswith("mask_decoder.hq_") for k in report.kept_at_init)
    for name, value in mask_decoder.state_dict().items():
        if name in hq_before:
            torch.testing.assert_close(value, hq_before[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(value, state_dict["mask_decoder." + name], rtol=0, atol=0)
    for name, value in prompt_encoder.state_dict().items():
        torch.testing.assert_close(value, state_dict["prompt_encoder." + name], rtol=0, atol=0)

    consumed = teacher.load_report.consumed + report.consumed
    assert len(consumed) == len(set(consumed)) == len(state_dict) == 37 + 17 + 120
    assert set(consumed) == set(state_dict)

    # A plain SAM decoder takes the same keys and keeps nothing at init.
    plain_report = load_sam_prompt_decoder(PromptEncoder(), MaskDecoder(hq_fusion=False), path)
    assert len(plain_report.consumed) == 137 and plain_report.kept_at_init == []


def test_mismatched_keys_are_named(tiny_checkpoint):
    _, state_dict = tiny_checkpoint
    key = "mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight"

    bad = dict(state_dict)
    bad[key] = torch.zeros(256, 256)
    decoder = MaskDecoder(hq_fusion=True)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_sam_prompt_decoder(PromptEncoder(), decoder, bad)
    assert key in str(error.value) and "(256, 256)" in str(error.value) and "(128, 256)" in str(error.value)
    for name, value in decoder.state_dict().items():  # nothing was copied
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    missing = {k: v for k, v in state_dict.items() if k != "prompt_encoder.no_mask_embed.weight"}
    with pytest.raises(ValueError, match=r"missing key 'prompt_encoder\.no_mask_embed\.weight' \(model expects shape \(1, 256\)\)"):
        load_sam_prompt_decoder(PromptEncoder(), MaskDecoder(), missing)

    extra = {**state_dict, "mask_decoder.hf_token.weight": torch.zeros(1, 256)}
    with pytest.raises(ValueError, match=r"unexpected key 'mask_decoder\.hf_token\.weight'"):
        load_sam_prompt_decoder(PromptEncoder(), MaskDecoder(), extra)

    vit_key = "image_encoder.blocks.0.attn.rel_pos_w"
    bad_vit = {**state_dict, vit_key: torch.zeros(5, 16)}
    encoder = ImageEncoderViT(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,))
    with pytest.raises(ValueError) as error:
        load_sam_image_encoder(encoder, bad_vit)
    assert vit_key in str(error.value) and "(5, 16)" in str(error.value) and "(3, 16)" in str(error.value)
    report = load_sam_image_encoder(encoder, state_dict)
    assert len(report.consumed) == 37

    no_qkv = {k: v for k, v in state_dict.items() if k != "image_encoder.blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"image_encoder\.blocks\.1\.attn\.qkv\.weight"):
        build_sam_vit_teacher(no_qkv)


class NotATensor:
    pass


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sam_checkpoint(tmp_path / "absent.pth")

    pickled_object = tmp_path / "object.pth"
    torch.save({"image_encoder.pos_embed": NotATensor()}, pickled_object)
    with pytest.raises(ValueError, match="weights_only"):
        load_sam_checkpoint(pickled_object)

    not_tensor = tmp_path / "int.pth"
    torch.save({"image_encoder.pos_embed": 3}, not_tensor)
    with pytest.raises(ValueError, match="not tensors"):
        load_sam_checkpoint(not_tensor)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_sam_checkpoint(garbage)

    decoder_only = tmp_path / "decoder_only.pth"
    torch.save({k: v for k, v in tiny_sam_state_dict().items() if not k.startswith("image_encoder.")}, decoder_only)
    with pytest.raises(ValueError, match="no 'image_encoder.\\*' keys"):
        load_sam_checkpoint(decoder_only)
    with pytest.raises(ValueError, match="no 'image_encoder.\\*' keys"):
        build_sam_vit_teacher(decoder_only)
    assert load_sam_checkpoint(decoder_only, require=("mask_decoder.",))  # explicitly allowed

    foreign = tmp_path / "foreign.pth"
    torch.save({**tiny_sam_state_dict(), "model.extra": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="model.extra"):
        load_sam_checkpoint(foreign)


# ---------------------------------------------------------------------------------------------
# ViT attention against the SAM formulas


def reference_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, rel_pos_h, rel_pos_w, heads):
    """One attention over a square token grid x [S, S, C], straight from the formulas:

    logit[(i, j), (k, l)] = q_ij . k_kl / sqrt(d) + q_ij . rel_pos_h[i - k + S - 1] + q_ij . rel_pos_w[j - l + S - 1]
    """
    size, _, width = x.shape
    d = width // heads
    qkv = x @ qkv_weight.T + qkv_bias  # [S, S, 3C] = q | k | v, each head-major
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
    out = torch.zeros_like(x)
    for n in range(heads):
        channels = slice(n * d, (n + 1) * d)
        for i in range(size):
            for j in range(size):
                query = q[i, j, channels]
                logits = torch.empty(size, size, dtype=x.dtype)
                for kk in range(size):
                    for ll in range(size):
                        logits[kk, ll] = (
                            query @ k[kk, ll, channels] / math.sqrt(d)
                            + query @ rel_pos_h[i - kk + size - 1]
                            + query @ rel_pos_w[j - ll + size - 1]
                        )
                weights = torch.softmax(logits.flatten(), dim=0).reshape(size, size)
                out[i, j, channels] = torch.einsum("kl,kld->d", weights, v[:, :, channels])
    return out @ proj_weight.T + proj_bias


def reference_block(block_params, x, heads, window):
    """SAM block on x [S, S, C]: LN -> (zero-pad to windows ->) attention per window (-> crop) -> residual -> MLP."""
    p = block_params
    size, _, width = x.shape
    normed = F.layer_norm(x, (width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
    attention_args = [p[k] for k in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                                     "attn.rel_pos_h", "attn.rel_pos_w")]
    if window == 0:
        attended = reference_attention(normed, *attention_args, heads)
    else:
        padded_size = math.ceil(size / window) * window
        padded = torch.zeros(padded_size, padded_size, width, dtype=x.dtype)
        padded[:size, :size] = normed  # padded tokens are zeros *after* the norm, and act as keys
        attended = torch.zeros_like(padded)
        for r in range(0, padded_size, window):
            for c in range(0, padded_size, window):
                attended[r : r + window, c : c + window] = reference_attention(
                    padded[r : r + window, c : c + window], *attention_args, heads
                )
        attended = attended[:size, :size]
    x = x + attended
    hidden = F.gelu(F.layer_norm(x, (width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6) @ p["mlp.lin1.weight"].T
                    + p["mlp.lin1.bias"])
    return x + hidden @ p["mlp.lin2.weight"].T + p["mlp.lin2.bias"]


@pytest.mark.parametrize("window", [2, 3, 0])  # 5x5 grid: padded to 6 (window 2, 3) or global
def test_vit_block_matches_sam_formulas(window):
    grid, width, heads = 5, 8, 2
    block = ViTBlock(width, num_heads=heads, mlp_ratio=2.0, window_size=window, input_size=(grid, grid)).double()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(1, grid, grid, width, dtype=torch.float64, generator=generator)
    params = {k: v.detach() for k, v in block.state_dict().items()}
    with torch.no_grad():
        expected = reference_block(params, x[0], heads, window)
        actual = block(x)[0]
    assert_close_rms(actual, expected, TOLERANCE[torch.float64], f"block window={window}")


def test_window_partition_round_trip():
    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 3, 3, 3) and padded == (6, 9)
    torch.testing.assert_close(windows[0], x[0, :3, :3])
    torch.testing.assert_close(window_unpartition(windows, 3, padded, (5, 7)), x)


def test_tiny_encoder_forward_backward_and_input_check():
    encoder = ImageEncoderViT(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,))
    image = torch.randn(1, 3, 64, 64)
    out = encoder(image)
    assert out.shape == (1, 256, 4, 4)
    out.square().mean().backward()
    assert encoder.blocks[0].attn.rel_pos_h.grad is not None and encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    # The gradients (relative-position tables, windowed and global attention, neck) are the loss's
    # derivatives: autograd against finite differences, both in fp64 (plain autograd, no custom backward
    # here; in fp32 the patch bias's gradient, a sum over patches that nearly cancels, is too rough).
    assert_gradients_match_finite_differences(encoder.double(), lambda module, x: module(x).square().mean(), image.double())
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        encoder(torch.randn(1, 3, 48, 48))


def test_released_sizes_run_at_1024_on_meta():
    """Shapes only (meta tensors, no compute): a padded 1024 x 1024 image -> a 256 x 64 x 64 embedding."""
    for name in ("vit_b", "vit_h"):
        with torch.device("meta"):
            out = build_vit(name)(torch.empty(1, 3, 1024, 1024))
        assert out.shape == (1, 256, 64, 64), name

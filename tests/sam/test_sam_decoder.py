"""SAM prompt encoder and mask decoder (with and without RWKV-SAM's high-quality fusion).

To keep the suite fast the decoders here are narrow (64 wide, 4 heads, MLP 256; SAM: 256, 8, 2048)
and run on an 8x8 image embedding (SAM: 64x64); nothing in the code depends on those sizes, and
the SAM-sized key names and shapes are checked separately (here and in test_sam_convert.py). Plain SAM decoding
is re-implemented below in functional torch on SAM's key names, as the oracle.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close_rms

from linmix.sam.mask_decoder import MaskDecoder, TwoWayAttention, TwoWayTransformer
from linmix.sam.prompt_encoder import PromptEncoder

GRID = 8  # image-embedding side; masks come out at 4 * GRID
WIDTH = 64  # transformer / prompt width
HEADS = 4
MLP_DIM = 256


def make_prompt_encoder() -> PromptEncoder:
    return PromptEncoder(
        embed_dim=WIDTH, image_embedding_size=(GRID, GRID), input_image_size=(16 * GRID, 16 * GRID), mask_in_chans=16
    )


def randomize_(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with noise so LayerNorm weights, biases and zero inits all matter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("weight") and parameter.dim() == 1:  # norm weights stay near 1
                parameter.copy_(1.0 + scale * noise)
            else:
                parameter.copy_(scale * noise)
    return module


def image_inputs(image_batch: int = 1, stage1: int = 64, stage2: int = 128):
    embeddings = torch.randn(image_batch, WIDTH, GRID, GRID)
    hq = (torch.randn(image_batch, stage1, 4 * GRID, 4 * GRID), torch.randn(image_batch, stage2, 2 * GRID, 2 * GRID))
    return embeddings, hq


def prompts(encoder: PromptEncoder, batch: int, points: int = 2):
    coords = torch.rand(batch, points, 2) * (16 * GRID)
    labels = torch.randint(0, 2, (batch, points))
    boxes = torch.sort(torch.rand(batch, 2, 2) * (16 * GRID), dim=1).values.reshape(batch, 4)
    with torch.no_grad():
        return encoder(points=(coords, labels), boxes=boxes, masks=None)


# ---------------------------------------------------------------------------------------------
# Functional SAM decoding on SAM's key names (the oracle)


def _attention(p, prefix, q, k, v, heads):
    q = F.linear(q, p[prefix + "q_proj.weight"], p[prefix + "q_proj.bias"])
    k = F.linear(k, p[prefix + "k_proj.weight"], p[prefix + "k_proj.bias"])
    v = F.linear(v, p[prefix + "v_proj.weight"], p[prefix + "v_proj.bias"])
    b, nq, c = q.shape
    nk = k.shape[1]
    q = q.reshape(b, nq, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, nk, heads, c // heads).transpose(1, 2)
    v = v.reshape(b, nk, heads, c // heads).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, nq, c)
    return F.linear(out, p[prefix + "out_proj.weight"], p[prefix + "out_proj.bias"])


def _layer_norm(p, prefix, x):
    return F.layer_norm(x, x.shape[-1:], p[prefix + "weight"], p[prefix + "bias"], eps=1e-5)


def _layer_norm_2d(p, prefix, x):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-6)
    return p[prefix + "weight"][:, None, None] * x + p[prefix + "bias"][:, None, None]


def _mlp(p, prefix, x, layers=3):
    for i in range(layers):
        x = F.linear(x, p[f"{prefix}layers.{i}.weight"], p[f"{prefix}layers.{i}.bias"])
        if i < layers - 1:
            x = F.relu(x)
    return x


def _hq_block(p, prefix, x, first_transposed):
    """One HQ conv block: (transposed 2x2 stride-2 | 3x3) conv, LayerNorm2d, GELU, 3x3 conv."""
    if first_transposed:
        x = F.conv_transpose2d(x, p[prefix + "0.weight"], p[prefix + "0.bias"], stride=2)
    else:
        x = F.conv2d(x, p[prefix + "0.weight"], p[prefix + "0.bias"], padding=1)
    x = F.gelu(_layer_norm_2d(p, prefix + "1.", x))
    return F.conv2d(x, p[prefix + "3.weight"], p[prefix + "3.bias"], padding=1)


def reference_sam_decode(p, image_embeddings, image_pe, sparse, dense, heads=HEADS, depth=2, hq_features=None):
    """SAM's MaskDecoder.predict_masks for one image (batch 1) and B prompts -> (masks [B,4,4h,4w], iou [B,4]).

    With ``hq_features = (stage1, stage2)`` the masks are RWKV-SAM's fused ones:
    ``fused = hq_mix(cat[up, hq_mid_res(stage2), hq_high_res(stage1)]) + up`` in place of ``up``.
    """
    batch = sparse.shape[0]
    output_tokens = torch.cat([p["iou_token.weight"], p["mask_tokens.weight"]], dim=0)
    tokens = torch.cat([output_tokens[None].expand(batch, -1, -1), sparse], dim=1)
    src = torch.repeat_interleave(image_embeddings, batch, dim=0) + dense
    pos = torch.repeat_interleave(image_pe, batch, dim=0)
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = pos.flatten(2).permute(0, 2, 1)
    queries = tokens
    for i in range(depth):
        t = f"transformer.layers.{i}."
        if i == 0:
            queries = _attention(p, t + "self_attn.", queries, queries, queries, heads)
        else:
            q = queries + tokens
            queries = queries + _attention(p, t + "self_attn.", q, q, queries, heads)
        queries = _layer_norm(p, t + "norm1.", queries)
        q, k = queries + tokens, keys + key_pe
        queries = _layer_norm(p, t + "norm2.", queries + _attention(p, t + "cross_attn_token_to_image.", q, k, keys, heads))
        hidden = F.relu(F.linear(queries, p[t + "mlp.lin1.weight"], p[t + "mlp.lin1.bias"]))
        queries = _layer_norm(p, t + "norm3.", queries + F.linear(hidden, p[t + "mlp.lin2.weight"], p[t + "mlp.lin2.bias"]))
        q, k = queries + tokens, keys + key_pe
        keys = _layer_norm(p, t + "norm4.", keys + _attention(p, t + "cross_attn_image_to_token.", k, q, queries, heads))
    q, k = queries + tokens, keys + key_pe
    queries = queries + _attention(p, "transformer.final_attn_token_to_image.", q, k, keys, heads)
    queries = _layer_norm(p, "transformer.norm_final_attn.", queries)

    src = keys.transpose(1, 2).reshape(b, c, h, w)
    up = F.conv_transpose2d(src, p["output_upscaling.0.weight"], p["output_upscaling.0.bias"], stride=2)
    up = F.gelu(_layer_norm_2d(p, "output_upscaling.1.", up))
    up = F.gelu(F.conv_transpose2d(up, p["output_upscaling.3.weight"], p["output_upscaling.3.bias"], stride=2))
    if hq_features is not None:
        stage1, stage2 = hq_features
        high = _hq_block(p, "hq_high_res.", stage1, False).expand(b, -1, -1, -1)
        mid = _hq_block(p, "hq_mid_res.", stage2, True).expand(b, -1, -1, -1)
        up = _hq_block(p, "hq_mix.", torch.cat([up, mid, high], 1), False) + up
    hyper = torch.stack(
        [_mlp(p, f"output_hypernetworks_mlps.{i}.", queries[:, 1 + i]) for i in range(4)], dim=1
    )
    masks = torch.einsum("bmc,bchw->bmhw", hyper, up)
    iou = _mlp(p, "iou_prediction_head.", queries[:, 0])
    return masks, iou


# ---------------------------------------------------------------------------------------------
# Prompt encoder


def test_prompt_encoder_shapes_and_padding():
    encoder = make_prompt_encoder()
    coords, labels = torch.rand(3, 5, 2) * 200, torch.ones(3, 5, dtype=torch.long)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0]]).expand(3, 4)
    sparse, dense = encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (3, 6, WIDTH)  # one padding point appended without a box
    assert dense.shape == (3, WIDTH, GRID, GRID)
    torch.testing.assert_close(dense, encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense))
    torch.testing.assert_close(sparse[:, -1], encoder.not_a_point_embed.weight.expand(3, -1))

    sparse, _ = encoder(points=(coords, labels), boxes=boxes, masks=None)
    assert sparse.shape == (3, 7, WIDTH)  # no padding when a box is given; box = two corner tokens
    sparse, _ = encoder(points=None, boxes=boxes, masks=None)
    assert sparse.shape == (3, 2, WIDTH)
    masks = torch.randn(3, 1, 4 * GRID, 4 * GRID)
    sparse, dense = encoder(points=None, boxes=None, masks=masks)
    assert sparse.shape == (3, 0, WIDTH) and dense.shape == (3, WIDTH, GRID, GRID)
    sparse, dense = encoder(points=None, boxes=None, masks=None)
    assert sparse.shape == (1, 0, WIDTH) and dense.shape == (1, WIDTH, GRID, GRID)
    assert encoder.get_dense_pe().shape == (1, WIDTH, GRID, GRID)
    assert sparse.dtype == dense.dtype == torch.float32


def test_prompt_encoder_matches_random_fourier_formula():
    """Embeddings from the formula: pe(p) = [sin(2 pi (2p - 1) G), cos(...)], p = (x + 0.5) / W, (y + 0.5) / H."""
    encoder = make_prompt_encoder()
    size = 16 * GRID
    gaussian = encoder.pe_layer.positional_encoding_gaussian_matrix
    assert gaussian.shape == (2, WIDTH // 2)

    def pe(xy):
        unit = (torch.as_tensor(xy, dtype=torch.float64) + 0.5) / size
        angle = 2 * math.pi * ((2 * unit - 1) @ gaussian.double())
        return torch.cat([angle.sin(), angle.cos()], dim=-1).float()

    coords = torch.tensor([[[3.0, 40.0], [100.0, 7.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    box = torch.tensor([[5.0, 6.0, 70.0, 80.0]])
    sparse, _ = encoder(points=(coords, labels), boxes=box, masks=None)
    weights = [e.weight[0] for e in encoder.point_embeddings]
    torch.testing.assert_close(sparse[0, 0], pe([3.0, 40.0]) + weights[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse[0, 1], pe([100.0, 7.0]) + weights[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse[0, 2], encoder.not_a_point_embed.weight[0])
    torch.testing.assert_close(sparse[0, 3], pe([5.0, 6.0]) + weights[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse[0, 4], pe([70.0, 80.0]) + weights[3], atol=1e-5, rtol=0)

    # Dense PE: cell (i, j) is the encoding of its centre in the unit square.
    dense_pe = encoder.get_dense_pe()[0]
    i, j = 5, 3
    unit = torch.tensor([(j + 0.5) / GRID, (i + 0.5) / GRID], dtype=torch.float64)
    angle = 2 * math.pi * ((2 * unit - 1) @ gaussian.double())
    torch.testing.assert_close(dense_pe[:, i, j], torch.cat([angle.sin(), angle.cos()]).float(), atol=1e-5, rtol=0)


def test_prompt_encoder_rejects_bad_prompts():
    encoder = make_prompt_encoder()
    with pytest.raises(ValueError, match="labels must be 1"):
        encoder(points=(torch.rand(1, 2, 2), torch.tensor([[1, 2]])), boxes=None, masks=None)
    with pytest.raises(ValueError, match=r"\[B, N, 2\]"):
        encoder(points=(torch.rand(1, 2, 3), torch.ones(1, 2)), boxes=None, masks=None)
    with pytest.raises(ValueError, match="XYXY"):
        encoder(points=None, boxes=torch.rand(2, 2, 2), masks=None)
    with pytest.raises(ValueError, match="prompt batch"):
        encoder(points=(torch.rand(2, 1, 2), torch.ones(2, 1)), boxes=torch.rand(3, 4), masks=None)
    with pytest.raises(ValueError, match="masks must have shape"):
        encoder(points=None, boxes=None, masks=torch.rand(1, 1, 2 * GRID, 2 * GRID))


# ---------------------------------------------------------------------------------------------
# Mask decoder


def narrow_decoder(**kwargs) -> MaskDecoder:
    transformer = TwoWayTransformer(embedding_dim=WIDTH, num_heads=HEADS, mlp_dim=MLP_DIM)
    return MaskDecoder(transformer_dim=WIDTH, transformer=transformer, iou_head_hidden_dim=WIDTH, **kwargs)


@pytest.fixture(scope="module")
def sam_weights():
    """A randomised plain-SAM decoder state dict (SAM key names)."""
    torch.manual_seed(3)
    return {k: v.clone() for k, v in randomize_(narrow_decoder(hq_fusion=False)).state_dict().items()}


def make_decoder(sam_weights, hq_fusion: bool, **kwargs) -> MaskDecoder:
    decoder = narrow_decoder(hq_fusion=hq_fusion, **kwargs)
    if hq_fusion:
        randomize_(decoder)
    missing, unexpected = decoder.load_state_dict(sam_weights, strict=False)
    assert not unexpected and all(name.startswith("hq_") for name in missing)
    return decoder.eval()


def test_sam_key_names_and_shapes():
    decoder = MaskDecoder(hq_fusion=False)
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert len(shapes) == 120
    assert shapes["mask_tokens.weight"] == (4, 256) and shapes["iou_token.weight"] == (1, 256)
    assert shapes["transformer.layers.1.cross_attn_image_to_token.q_proj.weight"] == (128, 256)
    assert shapes["transformer.layers.0.self_attn.out_proj.weight"] == (256, 256)
    assert shapes["transformer.final_attn_token_to_image.out_proj.weight"] == (256, 128)
    assert shapes["transformer.layers.0.mlp.lin1.weight"] == (2048, 256)
    assert shapes["output_upscaling.0.weight"] == (256, 64, 2, 2)
    assert shapes["output_upscaling.1.weight"] == (64,)
    assert shapes["output_upscaling.3.weight"] == (64, 32, 2, 2)
    assert shapes["output_hypernetworks_mlps.3.layers.2.weight"] == (32, 256)
    assert shapes["iou_prediction_head.layers.2.weight"] == (4, 256)
    hq_names = sorted({k.split(".")[0] for k in MaskDecoder(hq_fusion=True).state_dict()} - {k.split(".")[0] for k in shapes})
    assert hq_names == ["hq_high_res", "hq_mid_res", "hq_mix"]


@pytest.mark.parametrize("multimask_output, count", [(False, 1), (True, 3)])
@pytest.mark.parametrize("hq_fusion", [False, True])
def test_decoder_shapes_and_dtypes(sam_weights, multimask_output, count, hq_fusion):
    decoder = make_decoder(sam_weights, hq_fusion)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=3)
    embeddings, hq = image_inputs()
    with torch.no_grad():
        masks, iou = decoder(
            embeddings, encoder.get_dense_pe(), sparse, dense, multimask_output, hq_features=hq if hq_fusion else None
        )
    assert masks.shape == (3, count, 4 * GRID, 4 * GRID) and iou.shape == (3, count)
    assert masks.dtype == iou.dtype == torch.float32
    assert torch.isfinite(masks).all() and torch.isfinite(iou).all()


def test_plain_decoder_reproduces_sam(sam_weights):
    decoder = make_decoder(sam_weights, hq_fusion=False)
    encoder = randomize_(make_prompt_encoder())
    sparse, dense = prompts(encoder, batch=3)
    embeddings, _ = image_inputs()
    image_pe = encoder.get_dense_pe()
    with torch.no_grad():
        expected_masks, expected_iou = reference_sam_decode(sam_weights, embeddings, image_pe, sparse, dense)
        single, single_iou = decoder(embeddings, image_pe, sparse, dense, multimask_output=False)
        multi, multi_iou = decoder(embeddings, image_pe, sparse, dense, multimask_output=True)
    tol = 10 * TOLERANCE[torch.float32]
    assert_close_rms(single, expected_masks[:, :1], tol, "single mask")
    assert_close_rms(multi, expected_masks[:, 1:], tol, "multimask")
    # The IoU head scores each returned mask with its own output.
    assert_close_rms(single_iou, expected_iou[:, :1], tol, "single iou")
    assert_close_rms(multi_iou, expected_iou[:, 1:], tol, "multimask iou")


def test_hq_fusion_changes_masks_and_zero_mix_is_plain_sam(sam_weights):
    plain = make_decoder(sam_weights, hq_fusion=False)
    hq_decoder = make_decoder(sam_weights, hq_fusion=True)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=2)
    embeddings, hq = image_inputs()
    image_pe = encoder.get_dense_pe()
    with torch.no_grad():
        for multimask_output in (False, True):
            base_masks, base_iou = plain(embeddings, image_pe, sparse, dense, multimask_output)
            masks, iou = hq_decoder(embeddings, image_pe, sparse, dense, multimask_output, hq_features=hq)
            assert (masks - base_masks).abs().mean() > 1e-3 * base_masks.abs().mean()
            torch.testing.assert_close(iou, base_iou)  # the fusion only touches the mask path
        # With a zero last mix conv, fused == up: the HQ decoder must decode exactly like SAM.
        hq_decoder.hq_mix[-1].weight.zero_()
        hq_decoder.hq_mix[-1].bias.zero_()
        for multimask_output in (False, True):
            base_masks, _ = plain(embeddings, image_pe, sparse, dense, multimask_output)
            masks, _ = hq_decoder(embeddings, image_pe, sparse, dense, multimask_output, hq_features=hq)
            torch.testing.assert_close(masks, base_masks)


def test_hq_fusion_formula(sam_weights):
    """fused = mix(cat[up, mr, hr]) + up, masks = hyper(token) . fused, written out functionally."""
    decoder = make_decoder(sam_weights, hq_fusion=True)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=2)
    embeddings, (stage1, stage2) = image_inputs()
    image_pe = encoder.get_dense_pe()
    p = decoder.state_dict()

    with torch.no_grad():
        masks, _ = decoder(embeddings, image_pe, sparse, dense, True, hq_features=(stage1, stage2))
        output_tokens = torch.cat([p["iou_token.weight"], p["mask_tokens.weight"]])[None].expand(2, -1, -1)
        hidden, keys = decoder.transformer(
            embeddings.expand(2, -1, -1, -1) + dense, image_pe.expand(2, -1, -1, -1), torch.cat([output_tokens, sparse], 1)
        )
        up = decoder.output_upscaling(keys.transpose(1, 2).reshape(2, WIDTH, GRID, GRID))
        hr = _hq_block(p, "hq_high_res.", stage1, False).expand(2, -1, -1, -1)
        mr = _hq_block(p, "hq_mid_res.", stage2, True).expand(2, -1, -1, -1)
        fused = _hq_block(p, "hq_mix.", torch.cat([up, mr, hr], 1), False) + up
        hyper = torch.stack([_mlp(p, f"output_hypernetworks_mlps.{i}.", hidden[:, 1 + i]) for i in (1, 2, 3)], 1)
        expected = torch.einsum("bmc,bchw->bmhw", hyper, fused)
    assert_close_rms(masks, expected, 10 * TOLERANCE[torch.float32], "hq masks")


def test_batched_images_follow_repeat_interleave(sam_weights):
    """Image batch 2 with 4 prompts: prompts 0-1 use image 0, prompts 2-3 image 1."""
    decoder = make_decoder(sam_weights, hq_fusion=True)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=4)
    embeddings, (stage1, stage2) = image_inputs(image_batch=2)
    image_pe = encoder.get_dense_pe()
    with torch.no_grad():
        masks, iou = decoder(embeddings, image_pe, sparse, dense, True, hq_features=(stage1, stage2))
        for image in range(2):
            rows = slice(2 * image, 2 * image + 2)
            one = slice(image, image + 1)
            expected_masks, expected_iou = decoder(
                embeddings[one], image_pe, sparse[rows], dense[rows], True, hq_features=(stage1[one], stage2[one])
            )
            torch.testing.assert_close(masks[rows], expected_masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[rows], expected_iou, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="divide the prompt batch"):
        decoder(embeddings, image_pe, sparse[:3], dense[:3], True, hq_features=(stage1, stage2))


def test_decoder_rejects_bad_inputs(sam_weights):
    hq_decoder = make_decoder(sam_weights, hq_fusion=True)
    plain = make_decoder(sam_weights, hq_fusion=False)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=1)
    embeddings, (stage1, stage2) = image_inputs()
    image_pe = encoder.get_dense_pe()
    with pytest.raises(ValueError, match="hq_features"):
        hq_decoder(embeddings, image_pe, sparse, dense, False)
    with pytest.raises(ValueError, match="hq_fusion=False"):
        plain(embeddings, image_pe, sparse, dense, False, hq_features=(stage1, stage2))
    with pytest.raises(ValueError, match="stage-1"):
        hq_decoder(embeddings, image_pe, sparse, dense, False, hq_features=(stage1[:, :32], stage2))
    with pytest.raises(ValueError, match="stage-2"):
        hq_decoder(embeddings, image_pe, sparse, dense, False, hq_features=(stage1, stage2[..., :-1]))
    with pytest.raises(ValueError, match="image_embeddings"):
        plain(embeddings[:, : WIDTH // 2], image_pe, sparse, dense, False)


def test_stage_channels_are_configurable():
    full = MaskDecoder(hq_fusion=True, stage1_channels=32, stage2_channels=64)
    assert full.hq_high_res[0].weight.shape == (64, 32, 3, 3)
    assert full.hq_mid_res[0].weight.shape == (64, 64, 2, 2)  # ConvTranspose2d: [in, out, k, k]
    assert full.hq_mix[0].weight.shape == (64, 96, 3, 3)
    assert full.hq_mix[3].weight.shape == (32, 64, 3, 3)
    decoder = narrow_decoder(hq_fusion=True, stage1_channels=32, stage2_channels=64)
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=1)
    embeddings, hq = image_inputs(stage1=32, stage2=64)
    with torch.no_grad():
        masks, iou = decoder(embeddings, encoder.get_dense_pe(), sparse, dense, True, hq_features=hq)
    assert masks.shape == (1, 3, 4 * GRID, 4 * GRID) and iou.shape == (1, 3)


def test_gradients_reach_hq_modules_and_iou_head(sam_weights):
    decoder = make_decoder(sam_weights, hq_fusion=True).train()
    encoder = make_prompt_encoder()
    sparse, dense = prompts(encoder, batch=2)
    embeddings, hq = image_inputs()
    image_pe = encoder.get_dense_pe()
    masks, iou = decoder(embeddings, image_pe, sparse, dense, True, hq_features=hq)
    (masks.square().mean() + iou.square().mean()).backward()

    # The same loss through the functional reference (transformer, upscaling, HQ fusion, heads written
    # out on the state dict's names) in fp64: autograd there gives every parameter's expected gradient.
    leaves = {name: value.detach().double().requires_grad_() for name, value in decoder.named_parameters()}
    p = {**{name: value.double() for name, value in decoder.state_dict().items()}, **leaves}
    all_masks, all_iou = reference_sam_decode(p, embeddings.double(), image_pe.double(), sparse.double(), dense.double(),
                                              hq_features=tuple(h.double() for h in hq))
    assert_close_rms(masks, all_masks[:, 1:], 10 * TOLERANCE[torch.float32], "masks")
    reference_loss = all_masks[:, 1:].square().mean() + all_iou[:, 1:].square().mean()
    expected = dict(zip(leaves, torch.autograd.grad(reference_loss, list(leaves.values()), allow_unused=True)))
    # Key biases get zero gradient in exact arithmetic (softmax ignores a shift shared by all keys),
    # and fp32 rounding noise there: the bound has an absolute part, 1e-8 of the largest entry.
    noise = 1e-8 * max(float(g.abs().max()) for g in expected.values() if g is not None)
    for name, parameter in decoder.named_parameters():
        grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        want = torch.zeros_like(parameter) if expected[name] is None else expected[name].float()
        if want.abs().max() == 0:
            assert grad.abs().max() == 0, f"{name}: a gradient where none should flow"
            continue
        error = float((grad - want).double().square().mean().sqrt())
        bound = 1e-4 * float(want.double().square().mean().sqrt()) + noise
        assert error <= bound, f"{name} gradient: rms error {error:.3e} > {bound:.3e}"

    # Multimask output drops the single-mask token's mask and score: its hypernetwork and its IoU-head
    # row get exactly no gradient, while the HQ modules, the other heads and the mask tokens do.
    for name, parameter in decoder.named_parameters():
        if name.startswith("output_hypernetworks_mlps.0."):
            assert parameter.grad is None or parameter.grad.abs().max() == 0, name
    assert decoder.get_parameter("iou_prediction_head.layers.2.weight").grad[0].abs().max() == 0
    assert decoder.get_parameter("iou_prediction_head.layers.2.weight").grad[1:].abs().amax(dim=1).gt(0).all()
    for name in ("hq_high_res.0.weight", "hq_mid_res.0.weight", "hq_mix.3.weight", "iou_prediction_head.layers.2.weight",
                 "output_hypernetworks_mlps.3.layers.0.weight", "mask_tokens.weight"):
        grad = decoder.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_decoder_runs_in_bfloat16(sam_weights):
    decoder = make_decoder(sam_weights, hq_fusion=True).to(torch.bfloat16)
    encoder = make_prompt_encoder().to(torch.bfloat16)
    sparse, dense = prompts(encoder, batch=2)
    embeddings, (stage1, stage2) = image_inputs()
    with torch.no_grad():
        masks, iou = decoder(
            embeddings.bfloat16(), encoder.get_dense_pe(), sparse, dense, True,
            hq_features=(stage1.bfloat16(), stage2.bfloat16()),
        )
        reference = make_decoder(sam_weights, hq_fusion=True)
        reference.load_state_dict({k: v.float() for k, v in decoder.state_dict().items()})
        expected, _ = reference(
            embeddings.bfloat16().float(), encoder.get_dense_pe().float(), sparse.float(), dense.float(), True,
            hq_features=(stage1.bfloat16().float(), stage2.bfloat16().float()),
        )
    assert sparse.dtype == dense.dtype == masks.dtype == iou.dtype == torch.bfloat16
    assert_close_rms(masks, expected, 5 * TOLERANCE[torch.bfloat16], "bf16 masks")


def test_two_way_attention_matches_softmax_formula():
    attention = randomize_(TwoWayAttention(64, 4, downsample_rate=2))
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    p = {name: value for name, value in attention.state_dict().items()}
    expected = _attention(p, "", q, k, v, heads=4)
    assert_close_rms(attention(q, k, v), expected, TOLERANCE[torch.float32], "two-way attention")
    assert TwoWayTransformer().layers[0].cross_attn_token_to_image.internal_dim == 128


def test_sam_sized_decoder_shapes_on_meta():
    """SAM sizes (256 wide, 64x64 embedding, RWKV-SAM small stages), shapes only: masks come out at 256x256."""
    with torch.device("meta"):
        encoder = PromptEncoder()
        decoder = MaskDecoder(hq_fusion=True, stage1_channels=64, stage2_channels=128)
        sparse, dense = encoder(points=None, boxes=torch.zeros(5, 4), masks=None)
        hq = (torch.empty(1, 64, 256, 256), torch.empty(1, 128, 128, 128))
        masks, iou = decoder(torch.empty(1, 256, 64, 64), encoder.get_dense_pe(), sparse, dense, True, hq_features=hq)
    assert masks.shape == (5, 3, 256, 256) and iou.shape == (5, 3)

"""The whole RWKV-SAM model: composition, frames (preprocess / postprocess), registry, checkpoints.

Most tests inject a tiny model for 256x256 inputs (16x16 embedding, 64x64 low-res masks) so the
forward pass is cheap; nothing in the model depends on 1024 except the registry's builders, whose
shapes are checked on the meta device and whose tiny variant is built for the checkpoint tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sam_checkpoint_keys import sam_mask_decoder_shapes, sam_prompt_encoder_shapes

from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.sam.convert import load_sam_checkpoint
from linmix.sam.mask_decoder import MaskDecoder, TwoWayTransformer
from linmix.sam.model import (
    ImageFeatures,
    RwkvSam,
    build_rwkv_sam,
    load_rwkv_sam_weights,
    rwkv_sam_model_registry,
    save_rwkv_sam,
)
from linmix.sam.prompt_encoder import PromptEncoder

SMALL_PARAMETERS = 24_661_904  # the whole RWKV-SAM small model (spec: ~24.2M; backbone 19.73M as the spec)


def small_input_model(image_size: int = 256, hq_fusion: bool = True) -> RwkvSam:
    grid = image_size // 16
    encoder = RwkvSamImageEncoder("tiny")
    stage1, stage2, _ = encoder.backbone.stage_channels
    model = RwkvSam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(image_embedding_size=(grid, grid), input_image_size=(image_size, image_size)),
        mask_decoder=MaskDecoder(
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=512),
            hq_fusion=hq_fusion,
            stage1_channels=stage1,
            stage2_channels=stage2,
        ),
    )
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return small_input_model()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_param_counts_on_meta():
    counts = {}
    assert rwkv_sam_model_registry["default"] is rwkv_sam_model_registry["small"]
    for name in ("tiny", "small", "base", "large"):
        with torch.device("meta"):
            built = rwkv_sam_model_registry[name]()
        assert isinstance(built, RwkvSam) and not built.training and built.image_size == 1024
        counts[name] = count(built)
    assert counts["small"] == SMALL_PARAMETERS
    assert abs(counts["small"] - 24.2e6) / 24.2e6 < 0.025
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"]
    with torch.device("meta"):
        small = build_rwkv_sam("small")
        baseline = build_rwkv_sam("small", token_mixer="attention")
    # Only the token blocks differ: the decoders are the same size.
    assert count(small.mask_decoder) == count(baseline.mask_decoder)
    assert count(small.prompt_encoder) == count(baseline.prompt_encoder)
    assert count(baseline) - count(small) == count(baseline.image_encoder) - count(small.image_encoder) > 0
    # The HQ fusion reads the variant's stage widths.
    assert small.mask_decoder.stage1_channels == 64 and small.mask_decoder.stage2_channels == 128


def test_registry_shapes_at_1024_on_meta():
    with torch.device("meta"):
        built = build_rwkv_sam("small")
        features = built.get_image_features(torch.empty(1, 3, 1024, 1024))
        low_res, iou = built.decode(features, boxes=torch.zeros(2, 4), multimask_output=True)
    assert features.embedding.shape == (1, 256, 64, 64)
    assert [tuple(t.shape) for t in features.hq_features] == [(1, 64, 256, 256), (1, 128, 128, 128)]
    assert low_res.shape == (2, 3, 256, 256) and iou.shape == (2, 3)


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_rwkv_sam("huge")
    with pytest.raises(ValueError, match="either checkpoint"):
        build_rwkv_sam("tiny", "a.safetensors", sam_checkpoint="b.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_rwkv_sam("tiny", "/nonexistent/rwkv_sam.safetensors")


# ---------------------------------------------------------------------------------------------
# frames


def test_preprocess_normalises_and_pads_bottom_right(model):
    image = torch.randint(0, 256, (3, 100, 256), dtype=torch.uint8)
    out = model.preprocess(image)
    assert out.shape == (3, 256, 256) and out.dtype == torch.float32
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(out[:, :100], (image.float() - mean) / std)
    assert (out[:, 100:] == 0).all()
    assert model.preprocess(image[None].expand(2, -1, -1, -1)).shape == (2, 3, 256, 256)
    with pytest.raises(ValueError, match=r"\[1, 256\]"):
        model.preprocess(torch.zeros(3, 300, 10))
    with pytest.raises(ValueError, match="RGB"):
        model.preprocess(torch.zeros(4, 10, 10))


def test_postprocess_masks_upsamples_crops_and_resizes(model):
    low_res = torch.randn(2, 3, 64, 64)
    out = model.postprocess_masks(low_res, (128, 256), (50, 100))
    assert out.shape == (2, 3, 50, 100)
    full = F.interpolate(low_res, (256, 256), mode="bilinear", align_corners=False)
    expected = F.interpolate(full[..., :128, :256], (50, 100), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)
    # The crop keeps the top-left: logits on the padding (bottom half) never reach the output.
    padded = torch.zeros(1, 1, 64, 64)
    padded[..., 40:, :] = 100.0
    assert model.postprocess_masks(padded, (128, 256), (50, 100)).abs().max() < 1e-4


def test_constructor_checks():
    encoder = RwkvSamImageEncoder("tiny")
    with pytest.raises(ValueError, match="square"):
        RwkvSam(image_encoder=encoder, prompt_encoder=PromptEncoder(input_image_size=(256, 128)), mask_decoder=MaskDecoder())
    with pytest.raises(ValueError, match="3"):
        RwkvSam(image_encoder=encoder, prompt_encoder=PromptEncoder(), mask_decoder=MaskDecoder(), pixel_mean=(1.0, 2.0))
    with pytest.raises(TypeError):
        RwkvSam(encoder, PromptEncoder(), MaskDecoder())  # keyword-only, as SAM


# ---------------------------------------------------------------------------------------------
# forward


def test_forward_matches_per_image_decoding(model):
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (3, 256, 180), generator=generator).float()
    second = torch.randint(0, 256, (3, 120, 256), generator=generator).float()
    coords = torch.tensor([[[40.0, 50.0], [100.0, 30.0]], [[10.0, 200.0], [170.0, 5.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[10.0, 20.0, 200.0, 100.0]])
    batched_input = [
        {"image": first, "original_size": (512, 360), "point_coords": coords, "point_labels": labels},
        {"image": second, "original_size": (60, 128), "boxes": boxes, "mask_inputs": torch.randn(1, 1, 64, 64)},
    ]
    with torch.no_grad():
        outputs = model(batched_input, multimask_output=True)
        single = model(batched_input[:1], multimask_output=False)
    assert [tuple(o["masks"].shape) for o in outputs] == [(2, 3, 512, 360), (1, 3, 60, 128)]
    assert [tuple(o["iou_predictions"].shape) for o in outputs] == [(2, 3), (1, 3)]
    assert [tuple(o["low_res_logits"].shape) for o in outputs] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert all(o["masks"].dtype == torch.bool for o in outputs)
    assert single[0]["masks"].shape == (2, 1, 512, 360) and single[0]["iou_predictions"].shape == (2, 1)

    # Image 1 alone gives what it gave in the batch of two (images are independent).
    with torch.no_grad():
        features = model.get_image_features(model.preprocess(second)[None])
        low_res, iou = model.decode(features, boxes=boxes, mask_inputs=batched_input[1]["mask_inputs"])
    torch.testing.assert_close(low_res, outputs[1]["low_res_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, outputs[1]["iou_predictions"], rtol=1e-4, atol=1e-4)
    masks = model.postprocess_masks(low_res, (120, 256), (60, 128)) > model.mask_threshold
    assert (masks == outputs[1]["masks"]).float().mean() > 0.999


def test_forward_backward_reaches_every_part(model):
    model.zero_grad()
    image = torch.rand(3, 256, 256) * 255
    output = model(
        [{"image": image, "original_size": (256, 256), "boxes": torch.tensor([[5.0, 5.0, 100.0, 90.0]])}],
        multimask_output=False,
    )[0]
    output["low_res_logits"].square().mean().backward()
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part
    # A single-mask box prompt uses the box-corner and no-mask embeddings and the single-mask token's
    # hypernetwork; the point and mask-input paths and the other hypernetworks get exactly no gradient.
    used, unused = [], []
    for name, parameter in model.named_parameters():
        touched = parameter.grad is not None and bool(parameter.grad.abs().max() > 0)
        (used if touched else unused).append(name)
    for name in ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight",
                 "prompt_encoder.no_mask_embed.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"):
        assert name in used, name
    for prefix in ("prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.", "prompt_encoder.not_a_point_embed.",
                   "prompt_encoder.mask_downscaling.", "mask_decoder.output_hypernetworks_mlps.1.",
                   "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3."):
        names = [name for name, _ in model.named_parameters() if name.startswith(prefix)]
        assert names and all(name in unused for name in names), prefix
    model.zero_grad()


def test_forward_input_errors(model):
    with pytest.raises(ValueError, match="non-empty list"):
        model([], multimask_output=True)
    with pytest.raises(ValueError, match="original_size"):
        model([{"image": torch.zeros(3, 256, 256)}], multimask_output=True)
    with pytest.raises(ValueError, match="together"):
        model([{"image": torch.zeros(3, 256, 256), "original_size": (256, 256), "point_coords": torch.zeros(1, 1, 2)}], True)


def test_features_without_hq_fusion():
    plain = small_input_model(hq_fusion=False)
    with torch.no_grad():
        features = plain.get_image_features(torch.zeros(1, 3, 256, 256))
        low_res, _ = plain.decode(features, boxes=torch.tensor([[0.0, 0.0, 50.0, 50.0]]), multimask_output=False)
    assert isinstance(features, ImageFeatures) and features.hq_features is None
    assert low_res.shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="preprocessed"):
        plain.get_image_features(torch.zeros(1, 3, 1024, 1024))


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_safetensors_round_trip_tiny(tmp_path):
    torch.manual_seed(5)
    original = build_rwkv_sam("tiny")
    with torch.no_grad():  # move every weight off its init so the round trip is meaningful
        for parameter in original.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path / "rwkv_sam_tiny.safetensors"
    save_rwkv_sam(original, path)
    loaded = rwkv_sam_model_registry["tiny"](checkpoint=path)
    ours, theirs = original.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=0, msg=name)

    # A different variant is refused with the offending keys named, and nothing is copied.
    with torch.device("meta"):
        small = build_rwkv_sam("small")
    with pytest.raises(ValueError, match=r"wrong variant\?[\s\S]*checkpoint shape"):
        load_rwkv_sam_weights(small, path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_rwkv_sam_weights(original, garbage)


def test_position_in_embedding_adds_the_dense_positional_encoding(tmp_path):
    torch.manual_seed(6)
    plain = build_rwkv_sam("tiny", image_size=64)
    placed = build_rwkv_sam("tiny", image_size=64, position_in_embedding=True)
    placed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        without, with_position = plain.get_image_features(images), placed.get_image_features(images)
    torch.testing.assert_close(with_position.embedding, without.embedding + plain.prompt_encoder.get_dense_pe())
    for a, b in zip(with_position.hq_features, without.hq_features):
        torch.testing.assert_close(a, b)

    # The setting travels in the file's metadata and a contradicting request is refused.
    path = tmp_path / "placed.safetensors"
    save_rwkv_sam(placed, path)
    assert build_rwkv_sam("tiny", checkpoint=path).position_in_embedding
    with pytest.raises(ValueError, match="position_in_embedding=true, not False"):
        build_rwkv_sam("tiny", checkpoint=path, position_in_embedding=False)
    save_rwkv_sam(plain, tmp_path / "plain.safetensors")
    assert not build_rwkv_sam("tiny", checkpoint=tmp_path / "plain.safetensors").position_in_embedding


# A SAM-format checkpoint written from the spec's key list (the minimal construction of
# tests/sam/test_sam_convert.py: full-size prompt encoder and mask decoder, one image-encoder key).


def test_sam_checkpoint_initialises_prompt_encoder_and_decoder(tmp_path):
    shapes = {"image_encoder.pos_embed": (1, 4, 4, 32), **sam_prompt_encoder_shapes(), **sam_mask_decoder_shapes()}
    assert len(shapes) == 1 + 17 + 120
    generator = torch.Generator().manual_seed(7)
    state_dict = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    path = tmp_path / "sam_tiny.pth"
    torch.save(state_dict, path)
    assert load_sam_checkpoint(path).keys() == state_dict.keys()

    torch.manual_seed(11)
    reference = build_rwkv_sam("tiny")
    torch.manual_seed(11)  # same draw, so what SAM does not cover must equal the plain build
    built = rwkv_sam_model_registry["tiny"](sam_checkpoint=path)
    assert len(built.sam_load_report.consumed) == 137
    assert len(built.sam_load_report.kept_at_init) == 18
    for name, value in built.state_dict().items():
        if name in state_dict:
            torch.testing.assert_close(value, state_dict[name], rtol=0, atol=0, msg=name)
        else:  # image encoder and HQ fusion keep their initialisation
            assert name.startswith(("image_encoder.", "mask_decoder.hq_")), name
            torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=0, msg=name)

    bad = dict(state_dict)
    del bad["mask_decoder.iou_token.weight"]
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"missing key 'mask_decoder\.iou_token\.weight'"):
        build_rwkv_sam("tiny", sam_checkpoint=path)

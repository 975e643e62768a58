"""The RWKV-SAM backbone with vision-Mamba token mixers ("mamba": VMamba's SS2D, "mamba_bi": Vim-style):
parameter-matched to the RWKV backbone at every size, forward/backward, the predictor on top, and
ONNX export matching PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linmix.layers import VisionMambaBlock
from linmix.ops import native
from linmix.ops.dispatch import FORCE_REFERENCE_ENV
from linmix.sam.backbone import BACKBONE_VARIANTS, TOKEN_MIXERS, RwkvSamBackbone, RwkvSamImageEncoder
from linmix.sam.model import build_rwkv_sam, rwkv_sam_model_registry

MAMBA_MIXERS = ("mamba", "mamba_bi")

# Whole backbones (conv stages + 14 blocks + final norm), counted on the meta device:
# the Mamba block at C = 384 is SS2D 761,088 + MLP 4 C^2 + 3 C = 590,976 + norms and layer scales 6 C.
EXPECTED = {
    "tiny": {"rwkv": 4_957_664, "mamba": 5_113_568, "mamba_bi": 5_325_920},
    "small": {"rwkv": 19_727_296, "mamba": 20_039_104, "mamba_bi": 20_334_784},
    "base": {"rwkv": 78_702_464, "mamba": 79_326_080, "mamba_bi": 79_401_344},
    "large": {"rwkv": 139_103_136, "mamba": 139_934_624, "mamba_bi": 139_576_224},
}


def _count(variant, token_mixer) -> int:
    with torch.device("meta"):
        backbone = RwkvSamBackbone(variant, token_mixer)
    return sum(p.numel() for p in backbone.parameters())


def test_mamba_mixers_are_registered():
    assert set(MAMBA_MIXERS) <= set(TOKEN_MIXERS)
    assert isinstance(RwkvSamBackbone("tiny", "mamba").blocks[0], VisionMambaBlock)


@pytest.mark.parametrize("variant", list(BACKBONE_VARIANTS))
def test_parameter_matched_to_rwkv_at_every_size(variant):
    counts = {mixer: _count(variant, mixer) for mixer in ("rwkv", *MAMBA_MIXERS)}
    assert counts == EXPECTED[variant]
    for mixer in MAMBA_MIXERS:
        assert abs(counts[mixer] / counts["rwkv"] - 1) <= 0.10, (variant, mixer, counts)


@pytest.mark.parametrize("token_mixer", MAMBA_MIXERS)
def test_tiny_forward_backward_and_native_equals_torch(token_mixer, monkeypatch):
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("tiny", token_mixer)
    encoder.backbone.blocks = encoder.backbone.blocks[:4]  # the blocks are all alike: four keep it fast
    with torch.no_grad():  # non-trivial layer scale, so the Mamba branches matter in the comparison
        for block in encoder.backbone.blocks:
            block.gamma1.fill_(0.5)
    x = torch.randn(2, 3, 64, 48)
    out = encoder(x)
    assert out.embedding.shape == (2, 256, 4, 3)
    (out.embedding.square().mean() + out.stage1.mean() + out.stage2.mean()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert encoder.backbone.blocks[3].mixer.A_logs.grad.abs().sum() > 0
    encoder.eval()
    with torch.no_grad():
        auto = encoder(x).embedding  # the native scan kernel where it builds
        monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
        reference = encoder(x).embedding
    torch.testing.assert_close(auto, reference, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_and_drop_path():
    torch.manual_seed(0)
    backbone = RwkvSamBackbone("tiny", "mamba", drop_path_rate=0.2)
    backbone.blocks = backbone.blocks[:3]
    backbone.eval()
    x = torch.randn(1, 3, 32, 48)
    plain = backbone(x).tokens
    backbone.gradient_checkpointing = True
    checkpointed = backbone(x).tokens
    torch.testing.assert_close(checkpointed, plain)
    backbone.train()
    backbone(x).tokens.sum().backward()


def test_build_and_registry_accept_mamba_and_the_predictor_works(monkeypatch):
    from linmix.sam.predictor import RwkvSamPredictor

    torch.manual_seed(0)
    model = rwkv_sam_model_registry["tiny"](token_mixer="mamba", image_size=256).eval()
    assert model.image_encoder.backbone.token_mixer == "mamba"
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    predictor = RwkvSamPredictor(model)
    predictor.set_image(image)
    point = np.array([[30.0, 20.0]])
    masks, scores, logits = predictor.predict(point, np.array([1]), multimask_output=True)
    assert masks.shape == (3, 50, 70) and masks.dtype == bool and scores.shape == (3,) and logits.shape == (3, 64, 64)
    assert np.isfinite(scores).all() and np.isfinite(logits).all()
    # The same answer with every op in PyTorch (the native scan switched off).
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    predictor.set_image(image)
    _, scores_torch, logits_torch = predictor.predict(point, np.array([1]), multimask_output=True)
    np.testing.assert_allclose(logits, logits_torch, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores, scores_torch, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="token_mixer"):
        build_rwkv_sam("tiny", token_mixer="mamba3")


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_inference_uses_the_native_scan(monkeypatch):
    calls = []
    original = native.cross_selective_scan_native
    monkeypatch.setattr(native, "cross_selective_scan_native", lambda *a, **k: calls.append(1) or original(*a, **k))
    backbone = RwkvSamBackbone("tiny", "mamba").eval()
    with torch.no_grad():
        backbone(torch.randn(1, 3, 32, 32))
    assert len(calls) == 14


def _relative_max_error(actual, expected) -> float:
    actual = torch.as_tensor(actual).double()
    expected = expected.detach().double()
    assert tuple(actual.shape) == tuple(expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("token_mixer", ["mamba", pytest.param("mamba_bi", marks=pytest.mark.slow)])  # ~10 s each
def test_image_encoder_onnx_export_matches_pytorch(tmp_path, token_mixer):
    """Two token blocks at 256 px (T = 256 tokens): the exported graph uses the log-depth scan form."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from linmix.sam.export import export_image_encoder_onnx

    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("tiny", token_mixer).eval()
    encoder.backbone.blocks = encoder.backbone.blocks[:2]
    with torch.no_grad():
        for block in encoder.backbone.blocks:
            block.gamma1.fill_(0.5)
            block.gamma2.fill_(0.5)
    path = export_image_encoder_onnx(encoder, tmp_path / "encoder.onnx", image_size=256, optimize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, 256, 256)
    outputs = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = encoder(image)
    for name, actual, reference in zip(("embedding", "stage1", "stage2"), outputs, expected):
        error = _relative_max_error(actual, reference)
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"

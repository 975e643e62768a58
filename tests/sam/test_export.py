"""ONNX export of RWKV-SAM (linmix.sam.export), checked against PyTorch with onnxruntime on CPU.

The encoder is exported at 256x256 (T = 16 * 16 = 256 Bi-WKV tokens, several WKV chunks); the
decoder of the registry's tiny model at its real 64x64 grid, one file serving N = 1, 3, 5 points,
a box, and a mask input.
"""

from __future__ import annotations


import pytest
import torch

from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.sam.model import ImageFeatures, build_rwkv_sam

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from linmix.sam.export import export_decoder_onnx, export_image_encoder_onnx  # noqa: E402

TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|


def _relative_max_error(actual, expected) -> float:
    actual = torch.as_tensor(actual).double()
    expected = expected.detach().double()
    assert tuple(actual.shape) == tuple(expected.shape), f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_encoder(encoder, path, image_size):
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["image_embeddings", "stage1", "stage2"]
    torch.manual_seed(1)
    image = torch.randn(1, 3, image_size, image_size)
    outputs = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = encoder(image)
    grid = image_size // 16
    assert outputs[0].shape == (1, 256, grid, grid)
    for name, actual, reference in zip(("embedding", "stage1", "stage2"), outputs, expected):
        error = _relative_max_error(actual, reference)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def test_image_encoder_export_few_blocks(tmp_path):
    """The whole encoder path (stages, RWKV blocks with Bi-WKV, neck) with 2 of the 14 token blocks: fast."""
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("tiny").eval()
    encoder.backbone.blocks = encoder.backbone.blocks[:2]
    with torch.no_grad():  # non-trivial layer scale, so the RWKV branches matter in the comparison
        for block in encoder.backbone.blocks:
            block.gamma1.fill_(0.5)
            block.gamma2.fill_(0.5)
    path = export_image_encoder_onnx(encoder, tmp_path / "encoder.onnx", image_size=256)
    _check_encoder(encoder, path, 256)


@pytest.mark.slow  # about 45 s (export of 14 RWKV blocks; 145 s with optimize=True)
def test_image_encoder_export_full_tiny(tmp_path):
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny")
    path = export_image_encoder_onnx(model, tmp_path / "encoder.onnx", image_size=256, optimize=False)
    _check_encoder(model.image_encoder, path, 256)


def test_image_encoder_export_includes_position_in_embedding(tmp_path):
    """A model built with position_in_embedding exports the embedding RwkvSam.get_image_features gives."""
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny", image_size=64, position_in_embedding=True)
    model.image_encoder.backbone.blocks = model.image_encoder.backbone.blocks[:1]
    path = export_image_encoder_onnx(model, tmp_path / "encoder.onnx", image_size=64, optimize=False)
    image = torch.randn(1, 3, 64, 64)
    embedding = _session(path).run(["image_embeddings"], {"image": image.numpy()})[0]
    with torch.no_grad():
        expected = model.get_image_features(image).embedding
    assert _relative_max_error(embedding, expected) <= TOLERANCE


def test_image_encoder_export_rejects_bad_size(tmp_path):
    encoder = RwkvSamImageEncoder("tiny")
    with pytest.raises(ValueError, match="multiple of 16"):
        export_image_encoder_onnx(encoder, tmp_path / "x.onnx", image_size=250)


@pytest.fixture(scope="module")
def decoder_setup(tmp_path_factory):
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny")
    path = export_decoder_onnx(model, tmp_path_factory.mktemp("onnx") / "decoder.onnx")
    generator = torch.Generator().manual_seed(2)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    stage1 = torch.randn(1, 32, 256, 256, generator=generator)
    stage2 = torch.randn(1, 64, 128, 128, generator=generator)
    return model, _session(path), ImageFeatures(embedding, (stage1, stage2))


def _run_decoder(session, features, coords, labels, mask_input=None):
    stage1, stage2 = features.hq_features
    feeds = {
        "image_embeddings": features.embedding.numpy(),
        "stage1": stage1.numpy(),
        "stage2": stage2.numpy(),
        "point_coords": coords.float().numpy(),
        "point_labels": labels.float().numpy(),
        "mask_input": (torch.zeros(1, 1, 256, 256) if mask_input is None else mask_input).numpy(),
        "has_mask_input": torch.tensor([0.0 if mask_input is None else 1.0]).numpy(),
    }
    masks, iou = session.run(None, feeds)
    return masks, iou


def _assert_matches(actual, expected):
    masks, iou = actual
    expected_masks, expected_iou = expected
    assert masks.shape == (1, 3, 256, 256) and iou.shape == (1, 3)
    error_masks = _relative_max_error(masks, expected_masks)
    error_iou = _relative_max_error(iou, expected_iou)
    assert error_masks <= TOLERANCE and error_iou <= TOLERANCE, f"masks {error_masks:.2e}, iou {error_iou:.2e}"


def test_decoder_io(decoder_setup):
    _, session, _ = decoder_setup
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs) == ["image_embeddings", "stage1", "stage2", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    assert isinstance(inputs["point_coords"][1], str)  # symbolic N
    assert [o.name for o in session.get_outputs()] == ["masks", "iou_predictions"]


@pytest.mark.parametrize("num_points", [1, 3, 5, 8])
def test_decoder_points_dynamic(decoder_setup, num_points):
    model, session, features = decoder_setup
    generator = torch.Generator().manual_seed(10 + num_points)
    coords = torch.rand(1, num_points, 2, generator=generator) * 1023
    labels = torch.randint(0, 2, (1, num_points), generator=generator).float()
    with torch.no_grad():
        expected = model.decode(features, point_coords=coords, point_labels=labels)
    # SAM's ONNX convention: without a box, the caller appends one padding point (label -1).
    onnx_coords = torch.cat([coords, torch.zeros(1, 1, 2)], dim=1)
    onnx_labels = torch.cat([labels, -torch.ones(1, 1)], dim=1)
    _assert_matches(_run_decoder(session, features, onnx_coords, onnx_labels), expected)


@pytest.mark.parametrize("with_points", [False, True])
def test_decoder_box(decoder_setup, with_points):
    model, session, features = decoder_setup
    box = torch.tensor([[100.0, 200.0, 600.0, 700.5]])
    corners = box.reshape(1, 2, 2)
    corner_labels = torch.tensor([[2.0, 3.0]])
    if with_points:
        coords = torch.tensor([[[300.0, 400.0], [500.0, 650.0]]])
        labels = torch.tensor([[1.0, 0.0]])
        with torch.no_grad():
            expected = model.decode(features, point_coords=coords, point_labels=labels, boxes=box)
        onnx_coords, onnx_labels = torch.cat([coords, corners], 1), torch.cat([labels, corner_labels], 1)
    else:
        with torch.no_grad():
            expected = model.decode(features, boxes=box)
        onnx_coords, onnx_labels = corners, corner_labels
    _assert_matches(_run_decoder(session, features, onnx_coords, onnx_labels), expected)


def test_decoder_mask_input(decoder_setup):
    model, session, features = decoder_setup
    coords = torch.tensor([[[512.0, 300.0]]])
    labels = torch.tensor([[1.0]])
    mask_input = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.decode(features, point_coords=coords, point_labels=labels, mask_inputs=mask_input)
    onnx_coords = torch.cat([coords, torch.zeros(1, 1, 2)], dim=1)
    onnx_labels = torch.cat([labels, -torch.ones(1, 1)], dim=1)
    _assert_matches(_run_decoder(session, features, onnx_coords, onnx_labels, mask_input), expected)


def test_decoder_single_mask(tmp_path):
    torch.manual_seed(0)
    model = build_rwkv_sam("tiny")
    path = export_decoder_onnx(model, tmp_path / "decoder1.onnx", multimask_output=False)
    session = _session(path)
    generator = torch.Generator().manual_seed(3)
    features = ImageFeatures(
        torch.randn(1, 256, 64, 64, generator=generator),
        (torch.randn(1, 32, 256, 256, generator=generator), torch.randn(1, 64, 128, 128, generator=generator)),
    )
    coords, labels = torch.tensor([[[200.0, 800.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]])
    masks, iou = _run_decoder(session, features, coords, labels)
    with torch.no_grad():
        expected_masks, expected_iou = model.decode(
            features, point_coords=coords[:, :1], point_labels=labels[:, :1], multimask_output=False
        )
    assert masks.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert _relative_max_error(masks, expected_masks) <= TOLERANCE
    assert _relative_max_error(iou, expected_iou) <= TOLERANCE

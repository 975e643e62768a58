"""ONNX export of RWKV-SAM (linmix.sam.export), checked against PyTorch with onnxruntime on CPU.

The encoder is exported at 256x256 (T = 16 * 16 = 256 Bi-WKV tokens, several WKV chunks). The
decoder follows Segment Anything's ONNX convention: the tests run the client code of SAM's
``onnx_model_example`` notebook (predictor.set_image -> embedding; a padding point when there is no
box; coordinates mapped with the predictor's transform; zero mask input; ``orig_im_size`` =
``image.shape[:2]``; masks thresholded at 0) on the tiny random model of tests/tiny_sam.py (64 px
input) and compare with :meth:`RwkvSamPredictor.predict` on the same prompts, at non-square image
sizes (padding cropped) smaller and larger than the model's input.
"""

from __future__ import annotations


import pytest
import torch

import numpy as np
from tiny_sam import tiny_sam

from linmix.sam.automatic_mask_generator import calculate_stability_score
from linmix.sam.backbone import RwkvSamImageEncoder
from linmix.sam.mask_decoder import MaskDecoder, TwoWayTransformer
from linmix.sam.model import RwkvSam, build_rwkv_sam
from linmix.sam.predictor import RwkvSamPredictor
from linmix.sam.transforms import ResizeLongestSide

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from linmix.sam.export import SamDecoderOnnxModel, export_decoder_onnx, export_image_encoder_onnx  # noqa: E402

TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The decoder tensors here are tiny: thread hand-offs cost more than they save (seconds per call
    instead of tens of milliseconds on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert [o.name for o in session.get_outputs()] == ["image_embeddings", "stage1_features", "stage2_features"]
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



# --------------------------------------------------------------------------------------------------
# decoder: Segment Anything's ONNX client against RwkvSamPredictor

# (H, W) of the test images: both non-square (the padding is cropped), one smaller and one larger
# than the tiny model's 64 px input (so the final resize shrinks in one case and enlarges in the other).
IMAGE_SHAPES = [(48, 80), (100, 70)]
MASK_THRESHOLD = 0.0
BOUNDARY_PIXELS = 5  # binary masks may differ where |logit| is at rounding level


def _image(shape, seed):
    rng = np.random.default_rng(seed)
    height, width = shape
    image = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = (230, 180, 40)  # something to segment
    return image


@pytest.fixture(scope="module")
def model():
    return tiny_sam(seed=0).eval()


@pytest.fixture(scope="module")
def predictors(model):
    """(H, W) -> (image, a predictor with that image set)."""
    result = {}
    for seed, shape in enumerate(IMAGE_SHAPES):
        image = _image(shape, seed)
        predictor = RwkvSamPredictor(model)
        predictor.set_image(image)
        result[shape] = (image, predictor)
    return result


@pytest.fixture(scope="module")
def single_mask_session(model, tmp_path_factory):
    """The notebook's export: ``return_single_mask=True``, SAM's three outputs."""
    return _session(export_decoder_onnx(model, tmp_path_factory.mktemp("onnx") / "single.onnx", return_single_mask=True,
                                        optimize=False))


@pytest.fixture(scope="module")
def all_masks_session(model, tmp_path_factory):
    """All four mask tokens, with SAM's extra metrics (stability scores, areas)."""
    return _session(export_decoder_onnx(model, tmp_path_factory.mktemp("onnx") / "all.onnx", return_single_mask=False,
                                        return_extra_metrics=True, optimize=False))


def _run_onnx_client(session, predictor, image, *, input_point=None, input_label=None, input_box=None, mask_input=None):
    """The client code of SAM's onnx_model_example notebook, plus our two feature maps."""
    coords, labels = [], []
    if input_point is not None:
        coords.append(input_point)
        labels.append(input_label)
    if input_box is not None:  # a box is two corner points labelled 2 and 3; no padding point then
        coords.append(input_box.reshape(2, 2))
        labels.append(np.array([2, 3]))
    else:
        coords.append(np.array([[0.0, 0.0]]))
        labels.append(np.array([-1]))
    onnx_coord = np.concatenate(coords, axis=0)[None, :, :]
    onnx_label = np.concatenate(labels, axis=0)[None, :].astype(np.float32)
    onnx_coord = predictor.transform.apply_coords(onnx_coord, image.shape[:2]).astype(np.float32)
    if mask_input is None:
        onnx_mask_input = np.zeros((1, 1, *predictor.model.prompt_encoder.mask_input_size), dtype=np.float32)
        onnx_has_mask_input = np.zeros(1, dtype=np.float32)
    else:
        onnx_mask_input = mask_input
        onnx_has_mask_input = np.ones(1, dtype=np.float32)
    stage1, stage2 = predictor.get_image_features().hq_features
    ort_inputs = {
        "image_embeddings": predictor.get_image_embedding().cpu().numpy(),
        "point_coords": onnx_coord,
        "point_labels": onnx_label,
        "mask_input": onnx_mask_input,
        "has_mask_input": onnx_has_mask_input,
        "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
        "stage1_features": stage1.cpu().numpy(),
        "stage2_features": stage2.cpu().numpy(),
    }
    return session.run(None, ort_inputs), onnx_coord.shape[1]


def _predict(predictor, prompt, multimask_output):
    """RwkvSamPredictor.predict with the same prompt: (binary masks, logits, iou_predictions, low-res logits)."""
    kwargs = dict(point_coords=prompt.get("input_point"), point_labels=prompt.get("input_label"),
                  box=prompt.get("input_box"), mask_input=None if prompt.get("mask_input") is None else prompt["mask_input"][0])
    masks, iou, low_res = predictor.predict(**kwargs, multimask_output=multimask_output)
    logits, _, _ = predictor.predict(**kwargs, multimask_output=multimask_output, return_logits=True)
    return masks, logits, iou, low_res


def _assert_masks_match(onnx_logits, masks, logits):
    """Same logits (to fp32 rounding) and the same binary masks but for a handful of boundary pixels."""
    assert onnx_logits.shape == masks.shape, f"{onnx_logits.shape} != {masks.shape}"
    assert _relative_max_error(onnx_logits, torch.from_numpy(logits)) <= TOLERANCE
    binary = onnx_logits > MASK_THRESHOLD  # the notebook's threshold
    differing = binary != masks
    assert int(differing.sum()) <= BOUNDARY_PIXELS, f"{int(differing.sum())} pixels differ"
    assert np.all(np.abs(logits[differing]) < 1e-4 * np.abs(logits).max())
    assert 0 < masks.sum() < masks.size or masks.size == 0  # not a degenerate mask, so the check means something


def _prompts(image):
    """The notebook's examples, at this image's size: one point; several points; a box; a box and a
    background point; two points with the previous low-res mask as mask input."""
    height, width = image.shape[:2]
    point = np.array([[width * 0.5, height * 0.35]])
    return {
        "one point": dict(input_point=point, input_label=np.array([1])),
        "five points": dict(input_point=np.array([[width * f, height * g] for f, g in
                                                  [(0.5, 0.35), (0.4, 0.4), (0.1, 0.9), (0.9, 0.1), (0.6, 0.3)]]),
                            input_label=np.array([1, 1, 0, 0, 1])),
        "box": dict(input_box=np.array([width * 0.3, height * 0.2, width * 0.7, height * 0.55])),
        "box and point": dict(input_box=np.array([width * 0.3, height * 0.2, width * 0.7, height * 0.55]),
                              input_point=np.array([[width * 0.5, height * 0.5]]), input_label=np.array([0])),
    }


PROMPTS = ["one point", "five points", "box", "box and point"]


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("prompt_name", [*PROMPTS, "mask input"])
def test_onnx_client_single_mask_matches_predictor(single_mask_session, predictors, model, shape, prompt_name):
    """``return_single_mask=True`` (the notebook's export): SAM's rule picks the single-mask output for
    more than two ONNX points and the best multimask output otherwise; either equals the predictor's."""
    image, predictor = predictors[shape]
    if prompt_name == "mask input":  # the notebook's second example: the first run's low_res_logits fed back
        first = _prompts(image)["one point"]
        (_, _, low_res_logits), _ = _run_onnx_client(single_mask_session, predictor, image, **first)
        height, width = image.shape[:2]
        prompt = dict(input_point=np.array([[width * 0.5, height * 0.35], [width * 0.45, height * 0.45]]),
                      input_label=np.array([1, 1]), mask_input=low_res_logits)
    else:
        prompt = _prompts(image)[prompt_name]
    (masks, iou, low_res), num_points = _run_onnx_client(single_mask_session, predictor, image, **prompt)
    assert masks.shape == (1, 1, *image.shape[:2]) and iou.shape == (1, 1)
    assert low_res.shape == (1, 1, *model.prompt_encoder.mask_input_size)
    multimask = num_points <= 2
    expected_masks, expected_logits, expected_iou, expected_low_res = _predict(predictor, prompt, multimask)
    best = int(np.argmax(expected_iou)) if multimask else 0
    _assert_masks_match(masks[0, 0], expected_masks[best], expected_logits[best])
    assert abs(float(iou[0, 0]) - float(expected_iou[best])) <= 1e-4
    assert _relative_max_error(low_res[0, 0], torch.from_numpy(expected_low_res[best])) <= TOLERANCE


@pytest.mark.slow  # one more decoder export (15-40 s on 2 busy cores)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("prompt_name", ["one point", "box", "box and point"])
def test_onnx_client_all_masks_match_predictor(all_masks_session, predictors, model, shape, prompt_name):
    """``return_single_mask=False``: the four mask tokens; token 0 is the predictor's single mask
    (``multimask_output=False``), tokens 1-3 its multimask output. With the extra metrics: stability
    scores and areas of the upscaled masks."""
    image, predictor = predictors[shape]
    prompt = _prompts(image)[prompt_name]
    assert [o.name for o in all_masks_session.get_outputs()] == [
        "masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    (masks, iou, stability, areas, low_res), _ = _run_onnx_client(all_masks_session, predictor, image, **prompt)
    assert masks.shape == (1, 4, *image.shape[:2]) and iou.shape == stability.shape == areas.shape == (1, 4)
    assert areas.dtype == np.int64
    single = _predict(predictor, prompt, multimask_output=False)
    multi = _predict(predictor, prompt, multimask_output=True)
    expected_masks, expected_logits, expected_iou, expected_low_res = (
        np.concatenate([a, b], axis=0) for a, b in zip(single, multi)
    )
    for token in range(4):
        _assert_masks_match(masks[0, token], expected_masks[token], expected_logits[token])
    np.testing.assert_allclose(iou[0], expected_iou, rtol=0, atol=1e-4)
    assert _relative_max_error(low_res[0], torch.from_numpy(expected_low_res)) <= TOLERANCE
    np.testing.assert_array_less(np.abs(areas[0] - expected_masks.sum(axis=(1, 2))), BOUNDARY_PIXELS + 1)
    expected_stability = calculate_stability_score(torch.from_numpy(expected_logits), MASK_THRESHOLD, 1.0).numpy()
    np.testing.assert_allclose(stability[0], expected_stability, rtol=0, atol=1e-3)


def test_decoder_io_follows_sam(single_mask_session):
    inputs = {i.name: i for i in single_mask_session.get_inputs()}
    assert list(inputs) == ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                            "orig_im_size", "stage1_features", "stage2_features"]
    assert all(i.type == "tensor(float)" for i in inputs.values())
    assert isinstance(inputs["point_coords"].shape[1], str) and inputs["point_coords"].shape[1] == inputs["point_labels"].shape[1]
    assert inputs["orig_im_size"].shape == [2] and inputs["has_mask_input"].shape == [1]
    assert [o.name for o in single_mask_session.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    masks_shape = single_mask_session.get_outputs()[0].shape
    assert masks_shape[:2] == [1, 1] and all(isinstance(side, str) for side in masks_shape[2:])  # (H, W) from orig_im_size


@pytest.mark.parametrize("original", [(1, 1), (48, 80), (100, 70), (1500, 2250), (1023, 7), (333, 333), (64, 64)])
def test_resized_image_size_matches_resize_longest_side(original):
    for longest_side in (64, 384, 1024):
        size = SamDecoderOnnxModel.resized_image_size(torch.tensor(original, dtype=torch.float32), longest_side)
        assert tuple(size.tolist()) == ResizeLongestSide.get_preprocess_shape(*original, longest_side)


def test_decoder_wrapper_errors(model):
    with pytest.raises(ValueError, match="return_single_mask must be True or False"):
        SamDecoderOnnxModel(model, return_single_mask=1)
    with pytest.raises(ValueError, match="needs an RwkvSam"):
        SamDecoderOnnxModel(torch.nn.Linear(2, 2), return_single_mask=True)
    wrapper = SamDecoderOnnxModel(model, return_single_mask=True)
    inputs = (torch.zeros(1, 256, 4, 4), torch.zeros(1, 2, 2), torch.tensor([[1.0, -1.0]]), torch.zeros(1, 1, 16, 16),
              torch.zeros(1), torch.tensor([48.0, 80.0]))
    with pytest.raises(ValueError, match="stage1_features and stage2_features"):
        wrapper(*inputs)


@pytest.mark.slow  # one more decoder export (15-40 s on 2 busy cores)
@pytest.mark.parametrize("shape", IMAGE_SHAPES[:1])
def test_use_stability_score_with_single_mask(model, predictors, tmp_path, shape):
    """``use_stability_score``: the scores are the stability scores of the four low-res logits, and
    SAM's single-mask rule chooses by them."""
    session = _session(export_decoder_onnx(model, tmp_path / "stability.onnx", return_single_mask=True,
                                           use_stability_score=True, optimize=False))
    image, predictor = predictors[shape]
    for prompt_name in ("one point", "five points"):
        prompt = _prompts(image)[prompt_name]
        (masks, scores, low_res), num_points = _run_onnx_client(session, predictor, image, **prompt)
        single = _predict(predictor, prompt, multimask_output=False)
        multi = _predict(predictor, prompt, multimask_output=True)
        logits, low_res_all = (np.concatenate([a, b], axis=0) for a, b in zip(single[1::2], multi[1::2]))
        stability = calculate_stability_score(torch.from_numpy(low_res_all), MASK_THRESHOLD, 1.0).numpy()
        best = 0 if num_points > 2 else 1 + int(np.argmax(stability[1:]))
        assert abs(float(scores[0, 0]) - float(stability[best])) <= 1e-6
        _assert_masks_match(masks[0, 0], logits[best] > MASK_THRESHOLD, logits[best])
        assert _relative_max_error(low_res[0, 0], torch.from_numpy(low_res_all[best])) <= TOLERANCE


@pytest.mark.slow  # one more decoder export
def test_gelu_approximate_at_opset_17(model, predictors, tmp_path):
    """SAM's script options ``--gelu-approximate`` and ``--opset 17``: no Erf in the graph, masks close
    to the exact model's, and the model's own GELUs left exact."""
    import onnx

    path = export_decoder_onnx(model, tmp_path / "gelu.onnx", return_single_mask=True, gelu_approximate=True, opset=17,
                               optimize=False)
    graph = onnx.load(str(path))
    assert [entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")] == [17]
    assert not any(node.op_type == "Erf" for node in graph.graph.node)
    assert all(module.approximate == "none" for module in model.modules() if isinstance(module, torch.nn.GELU))
    image, predictor = predictors[IMAGE_SHAPES[0]]
    prompt = _prompts(image)["five points"]
    (masks, iou, _), _ = _run_onnx_client(_session(path), predictor, image, **prompt)
    _, logits, expected_iou, _ = _predict(predictor, prompt, multimask_output=False)
    assert _relative_max_error(masks[0, 0], torch.from_numpy(logits[0])) <= 2e-2
    assert abs(float(iou[0, 0]) - float(expected_iou[0])) <= 1e-2


@pytest.mark.slow  # one more decoder export
def test_decoder_without_hq_fusion_has_exactly_sams_inputs(model, tmp_path):
    """A plain SAM decoder (no high-quality fusion) exports SAM's six inputs and nothing else."""
    plain = RwkvSam(
        image_encoder=model.image_encoder,
        prompt_encoder=model.prompt_encoder,
        mask_decoder=MaskDecoder(transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
                                 hq_fusion=False),
    ).eval()
    session = _session(export_decoder_onnx(plain, tmp_path / "plain.onnx", return_single_mask=True, optimize=False))
    assert [i.name for i in session.get_inputs()] == ["image_embeddings", "point_coords", "point_labels", "mask_input",
                                                      "has_mask_input", "orig_im_size"]
    image = _image((48, 80), 0)
    predictor = RwkvSamPredictor(plain)
    predictor.set_image(image)
    point, label = np.array([[40.0, 17.0]]), np.array([1])
    feeds = {
        "image_embeddings": predictor.get_image_embedding().numpy(),
        "point_coords": predictor.transform.apply_coords(np.array([[[40.0, 17.0], [0.0, 0.0]]]), image.shape[:2]).astype(np.float32),
        "point_labels": np.array([[1, -1]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, 16, 16), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
    }
    masks, iou, _ = session.run(None, feeds)
    _, logits, expected_iou, _ = _predict(predictor, dict(input_point=point, input_label=label), multimask_output=True)
    best = int(np.argmax(expected_iou))
    assert _relative_max_error(masks[0, 0], torch.from_numpy(logits[best])) <= TOLERANCE
    assert abs(float(iou[0, 0]) - float(expected_iou[best])) <= 1e-4


@pytest.mark.slow  # an encoder and a decoder export
def test_encoder_outputs_feed_the_decoder_by_name(tmp_path):
    """The whole ONNX pipeline: the encoder graph's outputs are the decoder graph's inputs of the same
    names, and the pair gives the predictor's masks."""
    small = tiny_sam(seed=1).eval()
    small.image_encoder.backbone.blocks = small.image_encoder.backbone.blocks[:1]  # a faster export, same interfaces
    encoder = _session(export_image_encoder_onnx(small, tmp_path / "encoder.onnx", image_size=small.image_size, optimize=False))
    decoder = _session(export_decoder_onnx(small, tmp_path / "decoder.onnx", return_single_mask=True, optimize=False))
    image = _image((48, 80), 3)
    predictor = RwkvSamPredictor(small)
    predictor.set_image(image)
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)
    encoded = dict(zip([o.name for o in encoder.get_outputs()],
                       encoder.run(None, {"image": small.preprocess(resized)[None].numpy()})))
    prompt = _prompts(image)["box and point"]
    onnx_coord = np.concatenate([prompt["input_point"], prompt["input_box"].reshape(2, 2)])[None]
    feeds = {
        **encoded,
        "point_coords": predictor.transform.apply_coords(onnx_coord, image.shape[:2]).astype(np.float32),
        "point_labels": np.array([[0, 2, 3]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, 16, 16), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
    }
    assert set(feeds) == {i.name for i in decoder.get_inputs()}
    masks, iou, _ = decoder.run(None, feeds)
    expected_masks, logits, expected_iou, _ = _predict(predictor, prompt, multimask_output=False)
    _assert_masks_match(masks[0, 0], expected_masks[0], logits[0])
    assert abs(float(iou[0, 0]) - float(expected_iou[0])) <= 1e-4


@pytest.fixture
def segment_anything(monkeypatch):
    """segment-anything's package, imported with stand-ins for torchvision (which it imports but the
    ONNX model does not use); the stand-ins and the package leave sys.modules afterwards."""
    import sys
    import types

    import importlib.util

    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything is not installed (pip install segment-anything)")
    before = set(sys.modules)
    stubs = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms",
                                                       "torchvision.transforms.functional", "torchvision.ops",
                                                       "torchvision.ops.boxes")}
    stubs["torchvision.transforms.functional"].resize = stubs["torchvision.transforms.functional"].to_pil_image = None
    stubs["torchvision.ops.boxes"].batched_nms = stubs["torchvision.ops.boxes"].box_area = None
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    import segment_anything.modeling as modeling
    import segment_anything.utils.onnx as onnx_utils

    yield modeling, onnx_utils
    for name in set(sys.modules) - before:
        if name.startswith("segment_anything"):
            del sys.modules[name]


@pytest.mark.parametrize("return_single_mask", [False, True])
@pytest.mark.parametrize("use_stability_score", [False, True])
@pytest.mark.parametrize("return_extra_metrics", [False, True])
def test_decoder_wrapper_equals_segment_anythings_onnx_model(
    segment_anything, model, return_single_mask, use_stability_score, return_extra_metrics
):
    """Our SamDecoderOnnxModel and segment-anything's SamOnnxModel, given the same prompt encoder and
    (plain, no HQ fusion) mask decoder weights, compute the same outputs for every option."""
    modeling, onnx_utils = segment_anything
    torch.manual_seed(3)
    ours = RwkvSam(
        image_encoder=model.image_encoder,
        prompt_encoder=model.prompt_encoder,
        mask_decoder=MaskDecoder(transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
                                 hq_fusion=False),
    ).eval()
    grid, size = ours.prompt_encoder.image_embedding_size, ours.image_size
    sam_prompt_encoder = modeling.PromptEncoder(embed_dim=256, image_embedding_size=grid, input_image_size=(size, size),
                                                mask_in_chans=16)
    sam_mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    )
    sam_prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    sam_mask_decoder.load_state_dict(ours.mask_decoder.state_dict())
    image_encoder = torch.nn.Module()
    image_encoder.img_size = size  # all SamOnnxModel reads of the image encoder
    sam = modeling.Sam(image_encoder=image_encoder, prompt_encoder=sam_prompt_encoder, mask_decoder=sam_mask_decoder).eval()
    options = dict(return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                   return_extra_metrics=return_extra_metrics)
    reference = onnx_utils.SamOnnxModel(sam, **options)
    wrapper = SamDecoderOnnxModel(ours, **options)
    generator = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, 256, *grid, generator=generator)
    cases = [  # (coords, labels, has_mask_input): one click + padding; box + click; two clicks + padding with a mask
        ([[40.0, 20.0], [0.0, 0.0]], [1, -1], 0.0),
        ([[10.0, 5.0], [50.0, 30.0], [30.0, 12.0]], [2, 3, 0], 0.0),
        ([[40.0, 20.0], [12.0, 30.0], [0.0, 0.0]], [1, 1, -1], 1.0),
    ]
    for coords, labels, has_mask in cases:
        for orig_im_size in ((48.0, 80.0), (100.0, 70.0)):
            inputs = (embedding, torch.tensor([coords]), torch.tensor([labels], dtype=torch.float32),
                      torch.randn(1, 1, 4 * grid[0], 4 * grid[1], generator=generator), torch.tensor([has_mask]),
                      torch.tensor(orig_im_size))
            with torch.no_grad():
                expected, actual = reference(*inputs), wrapper(*inputs)
            assert len(actual) == len(expected) == len(wrapper.output_names)
            for name, got, want in zip(wrapper.output_names, actual, expected):
                assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
                if name == "areas":
                    assert torch.equal(got, want)
                else:
                    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5, msg=name)

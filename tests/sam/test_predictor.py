"""RwkvSamPredictor: SAM's predictor API on the real 1024-input tiny model (random weights).

One image is encoded once for the whole module (the encoder always sees a padded 1024x1024 input,
the expensive part on a CPU); the conversions of grayscale / RGBA / BGR inputs are checked on the
resized image handed to the encoder, without running it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linmix.sam.model import build_rwkv_sam
from linmix.sam.predictor import MAX_IMAGE_SIDE, ImageNotSetError, RwkvSamPredictor
from linmix.sam.transforms import ResizeLongestSide

HEIGHT, WIDTH = 50, 70


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_rwkv_sam("tiny")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(model, image):
    predictor = RwkvSamPredictor(model)
    predictor.set_image(image)
    return predictor


def captured_input(model, image, image_format="RGB"):
    """The resized [1, 3, H', W'] tensor set_image hands to set_torch_image (the encoder is not run)."""
    predictor = RwkvSamPredictor(model)
    seen = {}
    predictor.set_torch_image = lambda transformed, original: seen.update(image=transformed, original=original)
    predictor.set_image(image, image_format)
    return seen["image"], seen["original"]


# ---------------------------------------------------------------------------------------------
# transforms


def test_resize_longest_side():
    transform = ResizeLongestSide(1024)
    assert transform.get_preprocess_shape(HEIGHT, WIDTH, 1024) == (731, 1024)
    assert transform.get_preprocess_shape(90, 30, 1024) == (1024, 341)
    assert transform.get_preprocess_shape(1024, 1024, 1024) == (1024, 1024)
    image = np.full((30, 90, 3), 77, dtype=np.uint8)
    resized = transform.apply_image(image)
    assert resized.shape == (341, 1024, 3) and resized.dtype == np.uint8 and (resized == 77).all()
    assert transform.apply_image(image[:, :, 0]).shape == (341, 1024)
    # A ramp stays a ramp (antialiased bilinear; close to PIL's but not bit-identical).
    ramp = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (10, 1))[:, :, None].repeat(3, axis=2)
    small = ResizeLongestSide(50).apply_image(ramp)
    assert small.shape == (5, 50, 3) and (np.diff(small[0, :, 0].astype(int)) >= 0).all()
    torch_resized = transform.apply_image_torch(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert torch_resized.shape == (1, 3, 341, 1024)

    coords = np.array([[0.0, 0.0], [90.0, 30.0], [45.0, 15.0]])
    mapped = transform.apply_coords(coords, (30, 90))
    np.testing.assert_allclose(mapped, [[0, 0], [1024, 341], [512, 170.5]])
    assert coords[1, 0] == 90.0  # the input is not modified
    boxes = np.array([[0, 0, 90, 30], [9, 3, 18, 6]])
    np.testing.assert_allclose(transform.apply_boxes(boxes, (30, 90)), mapped[[0, 1]].reshape(1, 4).tolist()
                               + [[102.4, 34.1, 204.8, 68.2]])
    torch.testing.assert_close(
        transform.apply_boxes_torch(torch.from_numpy(boxes), (30, 90)),
        torch.from_numpy(transform.apply_boxes(boxes, (30, 90))).float(),
    )
    torch.testing.assert_close(transform.apply_coords_torch(torch.from_numpy(coords), (30, 90)), torch.from_numpy(mapped).float())
    with pytest.raises(ValueError, match="uint8"):
        transform.apply_image(image.astype(np.float32))
    with pytest.raises(ValueError, match="positive"):
        ResizeLongestSide(0)


# ---------------------------------------------------------------------------------------------
# outputs


def test_set_image_state(predictor, model):
    assert predictor.is_image_set and predictor.device == model.device
    assert predictor.original_size == (HEIGHT, WIDTH) and predictor.input_size == (731, 1024)
    embedding = predictor.get_image_embedding()
    assert embedding.shape == (1, 256, 64, 64) and torch.isfinite(embedding).all()
    stage1, stage2 = predictor.get_image_features().hq_features
    assert stage1.shape == (1, 32, 256, 256) and stage2.shape == (1, 64, 128, 128)


@pytest.mark.parametrize("multimask_output, count", [(True, 3), (False, 1)])
def test_predict_shapes_and_dtypes(predictor, multimask_output, count):
    masks, iou, low_res = predictor.predict(
        point_coords=np.array([[10, 20], [60, 40]]), point_labels=np.array([1, 0]), multimask_output=multimask_output
    )
    assert masks.shape == (count, HEIGHT, WIDTH) and masks.dtype == bool
    assert iou.shape == (count,) and iou.dtype == np.float32
    assert low_res.shape == (count, 256, 256) and low_res.dtype == np.float32
    logits, iou_again, _ = predictor.predict(
        point_coords=np.array([[10, 20], [60, 40]]), point_labels=np.array([1, 0]), multimask_output=multimask_output,
        return_logits=True,
    )
    assert logits.dtype == np.float32 and logits.shape == masks.shape
    np.testing.assert_array_equal(logits > 0.0, masks)
    np.testing.assert_allclose(iou_again, iou)


def _to_input_frame(xy):
    """(x, y) pixels of the HEIGHT x WIDTH image -> the 731 x 1024 resized input frame, by hand."""
    return torch.tensor(xy, dtype=torch.float32) * torch.tensor([1024 / WIDTH, 731 / HEIGHT])


def _masks_by_hand(model, low_res):
    """Low-res logits -> bool masks at the original size: upscale to 1024, crop the padding, resize, threshold."""
    upscaled = F.interpolate(torch.as_tensor(low_res)[None], (1024, 1024), mode="bilinear", align_corners=False)
    original = F.interpolate(upscaled[..., :731, :1024], (HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return (original[0] > model.mask_threshold).numpy()


def test_every_prompt_kind(predictor):
    model, features = predictor.model, predictor.features
    box = [5, 5, 60, 45]
    _, box_iou, low_res = predictor.predict(box=np.array(box), multimask_output=False)
    # A box is its two corners' tokens: position encodings of the corner pixels' centres plus the
    # learned top-left / bottom-right embeddings; no mask prompt means no_mask_embed everywhere.
    prompts = model.prompt_encoder
    corners = _to_input_frame([box[:2], box[2:]]) + 0.5
    sparse = prompts.pe_layer.forward_with_coords(corners[None], prompts.input_image_size) + torch.cat(
        [prompts.point_embeddings[2].weight, prompts.point_embeddings[3].weight])
    dense = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 64, 64)
    with torch.no_grad():
        expected_low_res, expected_iou = model.mask_decoder(
            image_embeddings=features.embedding, image_pe=prompts.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, hq_features=features.hq_features)
    np.testing.assert_allclose(low_res, expected_low_res[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(box_iou, expected_iou[0].numpy(), rtol=1e-5, atol=1e-5)

    # Point, box and mask together: the decoder's output on the prompts mapped by hand, and the masks
    # are those logits upscaled and thresholded.
    point = [30.5, 25.0]
    masks, iou, combined_low_res = predictor.predict(
        point_coords=np.array([point]), point_labels=np.array([1]), box=np.array([box]),
        mask_input=low_res, multimask_output=False,
    )
    assert masks.shape == (1, HEIGHT, WIDTH)
    with torch.no_grad():
        expected_low_res, expected_iou = model.decode(
            features, point_coords=_to_input_frame([point])[None], point_labels=torch.tensor([[1]]),
            boxes=_to_input_frame([box[:2], box[2:]]).reshape(1, 4), mask_inputs=torch.from_numpy(low_res)[None],
            multimask_output=False)
    np.testing.assert_allclose(combined_low_res, expected_low_res[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(iou, expected_iou[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masks, _masks_by_hand(model, combined_low_res))
    assert np.abs(combined_low_res - low_res).max() > 1e-3  # the point and the mask change the answer

    masks, _, mask_only_low_res = predictor.predict(mask_input=low_res)  # a mask alone is a prompt too
    assert masks.shape == (3, HEIGHT, WIDTH)
    with torch.no_grad():
        expected_low_res, _ = model.decode(features, mask_inputs=torch.from_numpy(low_res)[None])
    np.testing.assert_allclose(mask_only_low_res, expected_low_res[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masks, _masks_by_hand(model, mask_only_low_res))
    _, _, other_mask_low_res = predictor.predict(mask_input=-low_res)
    assert np.abs(other_mask_low_res - mask_only_low_res).max() > 1e-3  # the mask is read

    # Points on the far edges are inside, and map to the input frame's corners.
    _, _, edge_low_res = predictor.predict(point_coords=np.array([[0, 0], [WIDTH, HEIGHT]]), point_labels=np.array([1, 1]))
    with torch.no_grad():
        expected_low_res, _ = model.decode(
            features, point_coords=torch.tensor([[[0.0, 0.0], [1024.0, 731.0]]]), point_labels=torch.tensor([[1, 1]]))
    np.testing.assert_allclose(edge_low_res, expected_low_res[0].numpy(), rtol=1e-5, atol=1e-5)


def test_predict_equals_predict_torch(predictor):
    coords, labels, box = np.array([[12.0, 33.0], [50.0, 8.0]]), np.array([1, 0]), np.array([3.0, 2.0, 66.0, 47.0])
    masks, iou, low_res = predictor.predict(coords, labels, box, multimask_output=True, return_logits=True)
    transform = predictor.transform
    masks_t, iou_t, low_res_t = predictor.predict_torch(
        transform.apply_coords_torch(torch.from_numpy(coords), predictor.original_size)[None],
        torch.from_numpy(labels)[None],
        transform.apply_boxes_torch(torch.from_numpy(box), predictor.original_size),
        multimask_output=True,
        return_logits=True,
    )
    assert masks_t.shape == (1, 3, HEIGHT, WIDTH) and iou_t.shape == (1, 3) and low_res_t.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(masks_t[0].numpy(), masks, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(iou_t[0].numpy(), iou, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(low_res_t[0].numpy(), low_res, rtol=1e-5, atol=1e-5)


def test_batched_boxes_equal_one_by_one(predictor):
    boxes = np.array([[0, 0, 30, 20], [10, 15, 70, 50], [40, 5, 45, 48]], dtype=np.float64)
    transformed = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), predictor.original_size)
    masks, iou, low_res = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    assert masks.shape == (3, 1, HEIGHT, WIDTH) and masks.dtype == torch.bool
    assert iou.shape == (3, 1) and low_res.shape == (3, 1, 256, 256)
    for index, box in enumerate(boxes):
        one_masks, one_iou, one_low_res = predictor.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(low_res[index].numpy(), one_low_res, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(iou[index].numpy(), one_iou, rtol=1e-4, atol=1e-4)
        assert (masks[index].numpy() == one_masks).mean() > 0.999


def test_reset_image(predictor):
    other = copy.copy(predictor)
    other.reset_image()
    assert not other.is_image_set and other.features is None and other.original_size is None
    with pytest.raises(ImageNotSetError):
        other.predict(box=np.array([0, 0, 10, 10]))
    assert predictor.is_image_set  # the shallow copy's reset left the original alone


# ---------------------------------------------------------------------------------------------
# image formats


def test_grayscale_rgba_and_bgr_convert_to_rgb(model, image):
    rgb, original = captured_input(model, image)
    assert rgb.shape == (1, 3, 731, 1024) and rgb.dtype == torch.uint8 and original == (HEIGHT, WIDTH)

    gray = image[:, :, 1]
    expected_gray, _ = captured_input(model, np.repeat(gray[:, :, None], 3, axis=2))
    for form in (gray, gray[:, :, None]):
        torch.testing.assert_close(captured_input(model, form)[0], expected_gray, rtol=0, atol=0)

    rgba = np.concatenate([image, np.full((HEIGHT, WIDTH, 1), 9, dtype=np.uint8)], axis=2)
    torch.testing.assert_close(captured_input(model, rgba)[0], rgb, rtol=0, atol=0)

    bgr = np.ascontiguousarray(image[:, :, ::-1])
    torch.testing.assert_close(captured_input(model, bgr, "BGR")[0], rgb, rtol=0, atol=0)
    bgra = np.concatenate([bgr, rgba[:, :, 3:]], axis=2)
    torch.testing.assert_close(captured_input(model, bgra, "BGR")[0], rgb, rtol=0, atol=0)

    tall, original = captured_input(model, np.zeros((90, 30, 3), dtype=np.uint8))
    assert tall.shape == (1, 3, 1024, 341) and original == (90, 30)


# ---------------------------------------------------------------------------------------------
# errors


def test_no_image_set(model):
    fresh = RwkvSamPredictor(model)
    assert not fresh.is_image_set
    for call in (
        lambda: fresh.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1])),
        lambda: fresh.predict_torch(None, None, boxes=torch.tensor([[0.0, 0.0, 5.0, 5.0]])),
        fresh.get_image_embedding,
    ):
        with pytest.raises(ValueError, match=r"set_image"):
            call()
        with pytest.raises(RuntimeError):  # SAM raises RuntimeError; both are caught
            call()


@pytest.mark.parametrize(
    "bad, image_format, message",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "RGB", "uint8"),
        (np.zeros((10, 10, 3), dtype=np.int64), "RGB", "uint8"),
        (torch.zeros(10, 10, 3, dtype=torch.uint8), "RGB", "numpy array"),
        (np.zeros((2, 10, 10, 3), dtype=np.uint8), "RGB", "HxWx3"),
        (np.zeros(10, dtype=np.uint8), "RGB", "HxWx3"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "RGB", "HxWx3"),
        (np.zeros((3, 10, 10), dtype=np.uint8), "RGB", "HxWx3"),  # CHW by mistake
        (np.zeros((0, 10, 3), dtype=np.uint8), "RGB", "between 1 and 16384"),
        (np.zeros((10, 0), dtype=np.uint8), "RGB", "between 1 and 16384"),
        (np.zeros((1, MAX_IMAGE_SIDE + 1, 3), dtype=np.uint8), "RGB", "between 1 and 16384"),
        (np.zeros((10, 10, 3), dtype=np.uint8), "BGRA", "image_format"),
    ],
)
def test_bad_images(model, bad, image_format, message):
    fresh = RwkvSamPredictor(model)
    with pytest.raises(ValueError, match=message):
        fresh.set_image(bad, image_format)
    assert not fresh.is_image_set


def test_bad_torch_images(model):
    fresh = RwkvSamPredictor(model)
    with pytest.raises(ValueError, match="longest side resized to 1024"):
        fresh.set_torch_image(torch.zeros(1, 3, 50, 70), (50, 70))
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        fresh.set_torch_image(torch.zeros(3, 731, 1024), (50, 70))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one prompt"),
        ({"point_coords": np.array([[WIDTH + 1, 10]]), "point_labels": np.array([1])}, "inside the image"),
        ({"point_coords": np.array([[10, -0.5]]), "point_labels": np.array([1])}, "inside the image"),
        ({"point_coords": np.array([[np.nan, 1]]), "point_labels": np.array([1])}, "finite"),
        ({"point_coords": np.array([[1, 2], [3, 4]]), "point_labels": np.array([1])}, "one label per point"),
        ({"point_coords": np.array([1, 2]), "point_labels": np.array([1])}, "Nx2"),
        ({"point_labels": np.array([1])}, "without point_coords"),
        ({"point_coords": np.array([[1, 2]])}, "need point_labels"),
        ({"point_coords": np.array([[1, 2]]), "point_labels": np.array([2])}, "1 \\(foreground\\)"),
        ({"box": np.array([1, 2, 3])}, "4 numbers"),
        ({"box": np.array([[1, 2, 3, 4], [1, 2, 3, 4]])}, "4 numbers"),
        ({"box": np.array([30, 2, 10, 4])}, "x0 <= x1"),
        ({"box": np.array([1, 20, 10, 4])}, "y0 <= y1"),
        ({"box": np.array([0, 0, WIDTH + 5, 10])}, "inside the image"),
        ({"mask_input": np.zeros((256, 256))}, "1x256x256"),
        ({"mask_input": np.zeros((1, 64, 64))}, "1x256x256"),
    ],
)
def test_bad_prompts(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_bad_torch_prompts(predictor):
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    with pytest.raises(ValueError, match="at least one prompt"):
        predictor.predict_torch(None, None)
    with pytest.raises(ValueError, match="BxNx2"):
        predictor.predict_torch(torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="one label per point"):
        predictor.predict_torch(torch.zeros(1, 3, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="resized input"):
        predictor.predict_torch(torch.tensor([[[10.0, 800.0]]]), torch.ones(1, 1))  # y beyond H' = 731
    with pytest.raises(ValueError, match="Bx4"):
        predictor.predict_torch(None, None, boxes=box[0])
    with pytest.raises(ValueError, match="x0 <= x1"):
        predictor.predict_torch(None, None, boxes=box.flip(-1))
    with pytest.raises(ValueError, match="Bx1x256x256"):
        predictor.predict_torch(None, None, boxes=box, mask_input=torch.zeros(1, 256, 256))
    with pytest.raises(ValueError, match="prompt batch"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=box)
    # Padding points (label -1) may sit anywhere.
    masks, _, _ = predictor.predict_torch(
        torch.tensor([[[10.0, 10.0], [5000.0, 5000.0]]]), torch.tensor([[1, -1]]), multimask_output=False
    )
    assert masks.shape == (1, 1, HEIGHT, WIDTH)

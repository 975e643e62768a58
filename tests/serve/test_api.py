"""The web demo's JSON API through FastAPI's test client, on a tiny random RWKV-SAM (64 px input).

Masks are compared with what RwkvSamPredictor gives for the same prompt, so the API is checked to
serve the model's own answer (from the cached embedding), not just well-formed JSON.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from linmix.sam import RwkvSamPredictor  # noqa: E402
from linmix.sam.automatic_mask_generator import coco_rle_string_to_counts, rle_to_mask  # noqa: E402
from linmix.serve import ServeLimits, create_app  # noqa: E402
from linmix.serve.app import CachedImage, ImageCache  # noqa: E402
from linmix.visualize import decode_png  # noqa: E402
from tiny_sam import tiny_sam  # noqa: E402

HEIGHT, WIDTH = 40, 56


@pytest.fixture(scope="module")
def model():
    return tiny_sam(seed=1)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, limits=ServeLimits(cache_size=2, max_upload_bytes=200_000, max_side=512)))


@pytest.fixture(scope="module")
def uploaded(client, image):
    response = client.post("/api/images", files={"file": ("random.png", png_bytes(image), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<canvas" in page.text and "/api/images" in page.text
    spec = client.get("/openapi.json").json()
    assert {"/api/images", "/api/images/{image_id}/predict", "/api/health"} <= set(spec["paths"])
    upload = spec["paths"]["/api/images"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload  # the image goes in the form field `file`


def test_upload_reports_size_and_caches_by_content(client, image, uploaded):
    assert uploaded["width"] == WIDTH and uploaded["height"] == HEIGHT and uploaded["cached"] is False
    # The same pixels as JPEG-free PNG again: same id, no encoder run.
    again = client.post("/api/images", files={"file": ("copy.png", png_bytes(image), "image/png")}).json()
    assert again["image_id"] == uploaded["image_id"] and again["cached"] is True
    info = client.get(f"/api/images/{uploaded['image_id']}")
    assert info.status_code == 200 and info.json()["width"] == WIDTH
    assert client.get("/api/health").json()["model"]["image_size"] == 64


def test_predict_matches_the_predictor(client, model, image, uploaded):
    predictor = RwkvSamPredictor(model)
    predictor.set_image(image)
    prompts = [
        ({"points": [[20, 15]], "labels": [1]}, dict(point_coords=np.array([[20.0, 15.0]]), point_labels=np.array([1]), multimask_output=True)),
        ({"box": [5, 4, 40, 30]}, dict(box=np.array([5.0, 4.0, 40.0, 30.0]), multimask_output=False)),
        ({"points": [[20, 15], [50, 35]], "labels": [1, 0], "box": [5, 4, 40, 30]},
         dict(point_coords=np.array([[20.0, 15.0], [50.0, 35.0]]), point_labels=np.array([1, 0]),
              box=np.array([5.0, 4.0, 40.0, 30.0]), multimask_output=False)),
    ]
    for body, kwargs in prompts:
        response = client.post(f"/api/images/{uploaded['image_id']}/predict", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        masks, scores, _ = predictor.predict(**kwargs)
        assert len(result["masks"]) == len(masks)
        assert result["best"] == int(np.argmax(scores))
        np.testing.assert_allclose([m["score"] for m in result["masks"]], scores, atol=1e-4)
        for served, expected in zip(result["masks"], masks):
            png = decode_png(base64.b64decode(served["mask_png"]))
            assert png.shape == (HEIGHT, WIDTH) and set(np.unique(png)) <= {0, 255}
            np.testing.assert_array_equal(png == 255, expected)
            rle = {"size": served["rle"]["size"], "counts": coco_rle_string_to_counts(served["rle"]["counts"])}
            np.testing.assert_array_equal(rle_to_mask(rle), expected)
            assert served["area"] == int(expected.sum())


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "give a prompt"),
        ({"points": [[10, 10]], "labels": []}, "one entry per point"),
        ({"points": [[10, 10]], "labels": [2]}, "1 (foreground) or 0"),
        ({"points": [[500, 10]], "labels": [1]}, "inside the image"),
        ({"box": [30, 30, 10, 10]}, "x0 <= x1"),
        ({"box": [1, 2, 3]}, "box"),
        ({"points": [["a", 1]], "labels": [1]}, "points"),
    ],
)
def test_bad_prompts_are_422_with_a_message(client, uploaded, body, fragment):
    response = client.post(f"/api/images/{uploaded['image_id']}/predict", json=body)
    assert response.status_code == 422
    assert fragment in str(response.json()["detail"])


def test_unknown_image_is_404(client):
    response = client.post("/api/images/0123456789abcdef01234567/predict", json={"box": [0, 0, 5, 5]})
    assert response.status_code == 404 and "upload the image again" in response.json()["detail"]
    assert client.get("/api/images/nope").status_code == 404


def test_bad_uploads(client, image):
    def upload(data, content_type, name="x"):
        return client.post("/api/images", files={"file": (name, data, content_type)})

    cases = [
        (upload(b"GIF89a....", "image/gif"), 415, "unsupported content type"),
        (upload(b"%PDF-1.4", "application/pdf"), 415, "unsupported content type"),
        (upload(b"not an image at all", "image/png"), 400, "not a readable PNG"),
        (upload(png_bytes(image)[:60], "image/png"), 400, "not a readable PNG"),
        (upload(b"", "image/png"), 400, "empty"),
        (upload(png_bytes(image), "image/jpeg"), 415, "is PNG but was sent as 'image/jpeg'"),
        (upload(png_bytes(np.zeros((600, 8, 3), np.uint8)), "image/png"), 422, "image too large: 8x600"),
        (upload(np.random.default_rng(1).bytes(250_000), "image/png"), 413, "upload too large"),
    ]
    for response, status, fragment in cases:
        assert response.status_code == status, response.text
        assert fragment in response.json()["detail"]
    missing = client.post("/api/images", data={"other": "1"})
    assert missing.status_code == 422 and "file" in str(missing.json()["detail"])
    jpeg = upload(png_bytes(image, "JPEG"), "image/jpeg")
    assert jpeg.status_code == 200 and jpeg.json()["width"] == WIDTH


def test_declared_length_over_the_limit_is_refused_before_reading(model):
    app = create_app(model, limits=ServeLimits(max_upload_bytes=1000))
    client = TestClient(app)
    response = client.post("/api/images", content=b"x" * 50_000, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]


def test_cache_is_bounded_lru():
    cache = ImageCache(capacity=2)
    entry = lambda name: CachedImage(name, 1, 1, None, (1, 1), (1, 1), 0.0)  # noqa: E731
    cache.put(entry("a"))
    cache.put(entry("b"))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put(entry("c"))
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2


def test_eviction_then_404(model, image):
    client = TestClient(create_app(model, limits=ServeLimits(cache_size=1)))
    first = client.post("/api/images", files={"file": ("a.png", png_bytes(image), "image/png")}).json()
    client.post("/api/images", files={"file": ("b.png", png_bytes(255 - image), "image/png")})
    response = client.post(f"/api/images/{first['image_id']}/predict", json={"box": [1, 1, 20, 20]})
    assert response.status_code == 404


def test_concurrent_model_calls_are_bounded(model, image, monkeypatch):
    """With one model slot held by a running call, a second request waits, then gets 503 + Retry-After."""
    app = create_app(model, limits=ServeLimits(max_concurrent_model_calls=1, queue_timeout_s=0.2))
    client = TestClient(app)
    uploaded = client.post("/api/images", files={"file": ("a.png", png_bytes(image), "image/png")}).json()
    started, release = threading.Event(), threading.Event()
    original_decode = model.decode

    def slow_decode(*args, **kwargs):
        started.set()
        release.wait(10)
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", slow_decode)
    results = {}
    worker = threading.Thread(
        target=lambda: results.update(first=client.post(f"/api/images/{uploaded['image_id']}/predict", json={"box": [1, 1, 20, 20]}))
    )
    worker.start()
    assert started.wait(10)
    busy = client.post(f"/api/images/{uploaded['image_id']}/predict", json={"box": [1, 1, 20, 20]})
    release.set()
    worker.join(10)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
    assert results["first"].status_code == 200


def test_examples_are_served(client):
    examples = client.get("/api/examples").json()
    assert {e["name"] for e in examples} == {"shapes", "ring_and_wire", "overlap"}
    picture = client.get(examples[0]["url"])
    assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/api/examples/nope.png").status_code == 404


def test_limits_are_validated(model):
    with pytest.raises(ValueError, match="cache_size"):
        ServeLimits(cache_size=0)
    with pytest.raises(ValueError, match="content_types"):
        ServeLimits(content_types=("image/gif",))
    with pytest.raises(ValueError, match="RwkvSam"):
        create_app(object())


def test_upload_is_read_upright(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to view", as phone cameras write
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 10)).save(buffer, format="JPEG", exif=exif.tobytes())
    info = client.post("/api/images", files={"file": ("phone.jpg", buffer.getvalue(), "image/jpeg")}).json()
    assert (info["width"], info["height"]) == (20, 40)

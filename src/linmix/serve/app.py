"""The click-to-segment web demo: a FastAPI app around an RWKV-SAM model and one static HTML page.

    app = create_app(linmix.sam.load_default())     # then: uvicorn.run(app)  (or `linmix serve`)

Flow (Segment Anything's demo): the page uploads an image once (``POST /api/images``, multipart
field ``file``); the server encodes it with the image encoder, the slow part, and keeps the
embedding in a bounded LRU cache keyed by the image's content; every click or box then calls
``POST /api/images/{image_id}/predict``, which runs only the light prompt decoder against the cached
embedding. The JSON API is described by OpenAPI at ``/docs`` and ``/openapi.json``.

Limits (:class:`ServeLimits`): upload bytes (413), image content types (415), image sides and pixel
count (422), points per request (422), and a semaphore on concurrent model calls: a request that
waits longer than ``queue_timeout_s`` for a free slot gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from linmix.data.examples import EXAMPLES, example_path
from linmix.sam import RwkvSam, RwkvSamPredictor
from linmix.sam.automatic_mask_generator import counts_to_coco_rle_string, mask_to_rle
from linmix.utils.images import upright_rgb
from linmix.visualize import mask_to_png_bytes, png_base64

__all__ = ["ImageCache", "ServeLimits", "create_app"]

# Pillow format names accepted for each declared content type.
CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MULTIPART_OVERHEAD_BYTES = 16 * 1024  # boundaries and part headers around the file


@dataclass(frozen=True)
class ServeLimits:
    """What the server accepts.

    max_upload_bytes: largest upload (413 above). max_side / max_pixels: image size after decoding
    (422 above; checked from the header before the pixels are decoded). content_types: accepted
    uploads (415 otherwise). cache_size: image embeddings kept (least recently used dropped first).
    max_concurrent_model_calls: encoder / decoder runs at once; queue_timeout_s: how long a request
    waits for a slot before 503. max_points: points in one prompt.
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_side: int = 4096
    max_pixels: int = 16_777_216
    content_types: tuple[str, ...] = tuple(CONTENT_TYPES)
    cache_size: int = 16
    max_concurrent_model_calls: int = 2
    queue_timeout_s: float = 30.0
    max_points: int = 64

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_side", "max_pixels", "cache_size", "max_concurrent_model_calls", "max_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {getattr(self, name)}")
        unknown = [t for t in self.content_types if t not in CONTENT_TYPES]
        if unknown:
            raise ValueError(f"ServeLimits.content_types must be among {sorted(CONTENT_TYPES)}, got {unknown}")


@dataclass
class CachedImage:
    """An encoded image: the predictor state that prompts need (features, original and resized sizes)."""

    image_id: str
    width: int
    height: int
    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    encode_ms: float


@dataclass
class ImageCache:
    """A thread-safe LRU map image_id -> :class:`CachedImage` holding at most ``capacity`` entries."""

    capacity: int
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, image_id: str) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is not None:
                self._entries.move_to_end(image_id)
            return entry

    def put(self, entry: CachedImage) -> None:
        with self._lock:
            self._entries[entry.image_id] = entry
            self._entries.move_to_end(entry.image_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._entries


# -------------------------------------------------------------------------------------------------
# API schema


class ImageInfo(BaseModel):
    image_id: str = Field(description="Content hash of the image; use it in /api/images/{image_id}/predict.")
    width: int
    height: int
    cached: bool = Field(description="True when the embedding was already in the cache (no encoder run).")
    encode_ms: float = Field(description="Milliseconds the image encoder took for this image.")


class PredictRequest(BaseModel):
    points: list[tuple[float, float]] = Field(default_factory=list, description="Point prompts (x, y) in image pixels.")
    labels: list[int] = Field(default_factory=list, description="One per point: 1 foreground, 0 background.")
    box: tuple[float, float, float, float] | None = Field(default=None, description="Box prompt x0, y0, x1, y1 in pixels.")
    multimask: bool | None = Field(
        default=None, description="3 candidate masks or 1; default 3 for a lone point (ambiguous), else 1."
    )

    model_config = {
        "json_schema_extra": {"examples": [{"points": [[120, 80], [200, 90]], "labels": [1, 0]}, {"box": [40, 60, 220, 300]}]}
    }


class MaskOut(BaseModel):
    score: float = Field(description="Predicted IoU of this mask.")
    area: int = Field(description="Pixels inside the mask.")
    mask_png: str = Field(description="The mask as a base64 8-bit greyscale PNG at the image size (255 inside).")
    rle: dict = Field(description="The mask as COCO RLE: {size: [H, W], counts: compressed string}.")


class PredictResponse(BaseModel):
    image_id: str
    width: int
    height: int
    best: int = Field(description="Index of the mask with the highest predicted IoU.")
    masks: list[MaskOut]
    decode_ms: float = Field(description="Milliseconds the prompt decoder took.")


class ExampleInfo(BaseModel):
    name: str
    description: str
    url: str


# -------------------------------------------------------------------------------------------------
# the app


def _model_info(model: RwkvSam) -> dict[str, Any]:
    return {
        "name": type(model).__name__,
        "variant": getattr(model, "variant", None),
        "image_size": int(model.image_size),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def create_app(model: RwkvSam, *, limits: ServeLimits | None = None, title: str = "linmix RWKV-SAM demo") -> FastAPI:
    """A FastAPI app serving ``model``: the demo page at ``/``, the JSON API under ``/api``.

    Args:
        model: an :class:`RwkvSam` in eval mode (any image size; tests pass a tiny random one).
        limits: upload / size / concurrency limits (:class:`ServeLimits` defaults).
    """
    if not isinstance(model, RwkvSam):
        raise ValueError(f"create_app needs an RwkvSam model, got {type(model).__name__}")
    limits = limits or ServeLimits()
    model.eval()
    cache = ImageCache(limits.cache_size)
    model_slots = threading.BoundedSemaphore(limits.max_concurrent_model_calls)
    description = (
        "Upload an image once (`POST /api/images`, multipart field `file`), then ask for masks from points and "
        "boxes (`POST /api/images/{image_id}/predict`). The image embedding is computed once and cached. "
        f"Limits: uploads up to {limits.max_upload_bytes} bytes of {', '.join(limits.content_types)}; images up to "
        f"{limits.max_side} px a side and {limits.max_pixels} pixels; {limits.max_concurrent_model_calls} model "
        f"calls at once (503 after waiting {limits.queue_timeout_s:g} s)."
    )
    app = FastAPI(title=title, description=description, version="1")
    app.state.model = model
    app.state.cache = cache
    app.state.limits = limits

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # Refuse on the declared length, before the multipart body is read and spooled.
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
            return JSONResponse(status_code=413, content={"detail": f"upload too large: the limit is {limits.max_upload_bytes} bytes"})
        return await call_next(request)

    class _ModelSlot:
        """Bounds concurrent model calls; 503 when no slot frees up in time."""

        def __enter__(self) -> None:
            if not model_slots.acquire(timeout=limits.queue_timeout_s):
                raise HTTPException(
                    status_code=503,
                    detail=f"server busy: {limits.max_concurrent_model_calls} model calls are running; retry shortly",
                    headers={"Retry-After": "2"},
                )

        def __exit__(self, *exc: object) -> None:
            model_slots.release()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        page = resources.files("linmix.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/api/health", summary="Server and model status")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": _model_info(model), "cached_images": len(cache), "cache_capacity": limits.cache_size}

    @app.get("/api/examples", response_model=list[ExampleInfo], summary="The bundled example images")
    def examples() -> list[ExampleInfo]:
        return [ExampleInfo(name=e.name, description=e.description, url=f"/api/examples/{e.name}.png") for e in EXAMPLES]

    @app.get("/api/examples/{name}.png", summary="One bundled example image (PNG)", response_class=FileResponse)
    def example_image(name: str) -> FileResponse:
        if name not in {e.name for e in EXAMPLES}:
            raise HTTPException(status_code=404, detail=f"no example named {name!r}; see /api/examples")
        return FileResponse(example_path(name), media_type="image/png")

    @app.post(
        "/api/images",
        response_model=ImageInfo,
        summary="Upload an image and compute its embedding",
        responses={400: {"description": "Not a readable image"}, 413: {"description": "Upload too large"},
                   415: {"description": "Unsupported content type"}, 422: {"description": "Image too large or malformed request"},
                   503: {"description": "Server busy"}},
    )
    def upload_image(file: UploadFile = File(..., description="PNG, JPEG or WebP image.")) -> ImageInfo:
        pixels = _read_upload(file, limits)
        image_id = hashlib.sha256(
            f"{pixels.shape[0]}x{pixels.shape[1]}:".encode() + pixels.tobytes()
        ).hexdigest()[:24]
        height, width = pixels.shape[:2]
        cached = cache.get(image_id)
        if cached is not None:
            return ImageInfo(image_id=image_id, width=width, height=height, cached=True, encode_ms=cached.encode_ms)
        predictor = RwkvSamPredictor(model)
        with _ModelSlot():
            start = time.perf_counter()
            predictor.set_image(pixels)
            encode_ms = (time.perf_counter() - start) * 1000
        cache.put(CachedImage(image_id, width, height, predictor.features, predictor.original_size, predictor.input_size, encode_ms))
        return ImageInfo(image_id=image_id, width=width, height=height, cached=False, encode_ms=round(encode_ms, 1))

    @app.get("/api/images/{image_id}", response_model=ImageInfo, summary="Whether an image is still cached")
    def image_info(image_id: str) -> ImageInfo:
        entry = _cached(cache, image_id)
        return ImageInfo(image_id=image_id, width=entry.width, height=entry.height, cached=True, encode_ms=round(entry.encode_ms, 1))

    @app.post(
        "/api/images/{image_id}/predict",
        response_model=PredictResponse,
        summary="Masks for points and/or a box on an uploaded image",
        responses={404: {"description": "Unknown or evicted image_id: upload the image again"},
                   422: {"description": "Bad prompt (no prompt, point off the image, labels not 0/1, ...)"},
                   503: {"description": "Server busy"}},
    )
    def predict(image_id: str, prompt: PredictRequest) -> PredictResponse:
        entry = _cached(cache, image_id)
        if not prompt.points and prompt.box is None:
            raise HTTPException(status_code=422, detail="give a prompt: at least one point or a box")
        if len(prompt.points) > limits.max_points:
            raise HTTPException(status_code=422, detail=f"at most {limits.max_points} points per prompt, got {len(prompt.points)}")
        if len(prompt.labels) != len(prompt.points):
            raise HTTPException(
                status_code=422, detail=f"labels must have one entry per point: {len(prompt.points)} points, {len(prompt.labels)} labels"
            )
        if any(label not in (0, 1) for label in prompt.labels):
            raise HTTPException(status_code=422, detail=f"labels must be 1 (foreground) or 0 (background), got {prompt.labels}")
        predictor = RwkvSamPredictor(model)
        # The cached encoder output stands in for set_image (the predictor's documented state).
        predictor.features, predictor.original_size, predictor.input_size = entry.features, entry.original_size, entry.input_size
        predictor.is_image_set = True
        multimask = prompt.multimask
        if multimask is None:
            multimask = len(prompt.points) == 1 and prompt.box is None
        with _ModelSlot():
            start = time.perf_counter()
            try:
                masks, scores, _ = predictor.predict(
                    point_coords=np.asarray(prompt.points, dtype=np.float64) if prompt.points else None,
                    point_labels=np.asarray(prompt.labels, dtype=np.int64) if prompt.points else None,
                    box=np.asarray(prompt.box, dtype=np.float64) if prompt.box is not None else None,
                    multimask_output=bool(multimask),
                )
            except ValueError as error:  # a point off the image, an inverted box, ...
                raise HTTPException(status_code=422, detail=str(error)) from error
            decode_ms = (time.perf_counter() - start) * 1000
        rles = mask_to_rle(masks.astype(bool))
        out = [
            MaskOut(
                score=round(float(score), 5),
                area=int(mask.sum()),
                mask_png=png_base64(mask_to_png_bytes(mask)),
                rle={"size": list(rle["size"]), "counts": counts_to_coco_rle_string(rle["counts"])},
            )
            for mask, score, rle in zip(masks, scores, rles)
        ]
        return PredictResponse(
            image_id=image_id, width=entry.width, height=entry.height, best=int(np.argmax(scores)), masks=out,
            decode_ms=round(decode_ms, 1),
        )

    return app


def _cached(cache: ImageCache, image_id: str) -> CachedImage:
    entry = cache.get(image_id)
    if entry is None:
        raise HTTPException(status_code=404, detail=f"unknown image_id {image_id!r} (never uploaded, or evicted from the cache): upload the image again")
    return entry


def _read_upload(file: UploadFile, limits: ServeLimits) -> np.ndarray:
    """Check the upload against ``limits`` and decode it to HxWx3 uint8 RGB, or raise a 4xx HTTPException."""
    from PIL import Image, UnidentifiedImageError

    content_type = (file.content_type or "").split(";")[0].strip().lower()
    if content_type not in limits.content_types:
        raise HTTPException(
            status_code=415, detail=f"unsupported content type {content_type or 'none'!r}: upload one of {', '.join(limits.content_types)}"
        )
    data = file.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(status_code=413, detail=f"upload too large: the limit is {limits.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(status_code=400, detail="the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header gives the size: refuse huge images before decoding any pixels.
            width, height = image.size
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise HTTPException(
                    status_code=422,
                    detail=f"image too large: {width}x{height}; the limits are {limits.max_side} px a side and {limits.max_pixels} pixels",
                )
            if image.format != CONTENT_TYPES[content_type]:
                raise HTTPException(
                    status_code=415, detail=f"the file is {image.format or 'unknown'} but was sent as {content_type!r}"
                )
            # Upright as the browser shows it (EXIF orientation), so clicked pixels match.
            return upright_rgb(image)
    except HTTPException:
        raise
    except Image.DecompressionBombError as error:
        raise HTTPException(status_code=422, detail=f"image too large: {error}") from error
    except UnidentifiedImageError as error:
        raise HTTPException(status_code=400, detail=f"the upload is not a readable {CONTENT_TYPES[content_type]} image") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise HTTPException(status_code=400, detail=f"the upload is not a readable {CONTENT_TYPES[content_type]} image: {error}") from error

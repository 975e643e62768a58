"""RWKV-SAM data: the high-quality benchmark formats, a procedural high-quality dataset, prompt
sampling and augmentation, and the step-addressed batch source the shared Trainer consumes.

Every dataset is a sequence of :class:`SegmentationSample` (``image`` HxWx3 uint8 RGB, ``masks``
KxHxW bool, one per object, ``name``):

- :class:`ImageMaskFolderDataset` (and :func:`load_hq_dataset` for the named layouts): DIS5K
  (``im/`` + ``gt/``), ThinObject5K (``images_test/`` + ``masks_test/``, or ``images/`` + ``masks/``),
  COIFT (``images/`` + ``masks/``), HRSOD (``images/`` + ``masks_max255/``, or ``masks/``): one
  mask per image, matched by file stem, foreground = mask value > 127.
- :class:`SA1BDataset`: ``sa_*.jpg`` beside ``sa_*.json`` (``annotations[*].segmentation`` in COCO RLE).
- :class:`CocoInstancesDataset`: a COCO ``instances_*.json`` (polygons, RLE or compressed RLE) and
  its image folder.
- :class:`ProceduralHQDataset`: seeded synthetic images with thin wires, frames with holes,
  branching shapes and text-like strokes on textured backgrounds, at several resolutions, with
  exact masks (a pure function of ``(seed, index)``).

A corrupt image or a mask whose size differs from its image raises :class:`DatasetError` naming the
file; ``validate()`` checks every item up front so a bad file stops a run before step 1, not in epoch 3.

Prompts follow the RWKV-SAM / HQ-SAM recipe (spec section 4): a tight box with noise, or 1-5
positive points inside the mask with optional negative points outside it. Training augmentation:
horizontal flip, large-scale jitter (resize by 0.5-2x of the fit-to-frame scale), crop / pad to
the square model frame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "HQ_DATASET_LAYOUTS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "CocoInstancesDataset",
    "DatasetError",
    "ImageMaskFolderDataset",
    "PromptBatchSource",
    "ProceduralHQDataset",
    "SA1BDataset",
    "SegmentationSample",
    "TeacherFeatureBatchSource",
    "augment_sample",
    "default_box_noise_cap",
    "load_dataset",
    "load_hq_dataset",
    "prepare_image",
    "sample_box_prompt",
    "sample_point_prompt",
    "tight_box",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's, in 0-255 units
PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset file that cannot be used (unreadable, corrupt, wrong size); the message names it."""


@dataclass
class SegmentationSample:
    """One image and its object masks: image ``[H, W, 3]`` uint8 RGB, masks ``[K, H, W]`` bool."""

    image: np.ndarray
    masks: np.ndarray
    name: str


# --------------------------------------------------------------------------------------------------
# image files


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return image


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, decoding it fully so truncated files are caught."""
    image = _open_image(path)
    return image.height, image.width


def read_rgb(path: str | PathLike[str]) -> np.ndarray:
    """An image file -> ``[H, W, 3]`` uint8 RGB (grayscale / RGBA converted); DatasetError if corrupt."""
    return np.array(_open_image(Path(path)).convert("RGB"), dtype=np.uint8)  # a writable copy


def read_mask(path: str | PathLike[str]) -> np.ndarray:
    """A mask image -> ``[H, W]`` bool, foreground where the (first-channel / gray) value exceeds 127."""
    image = _open_image(Path(path))
    if image.mode in ("1",):
        return np.asarray(image, dtype=bool)
    return np.asarray(image.convert("L"), dtype=np.uint8) > 127


def _check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[-2:]:
        raise DatasetError(
            f"mask {mask_path} has size (H, W) = {tuple(mask.shape[-2:])} but its image {image_path} has "
            f"{tuple(image.shape[:2])}"
        )


class _FileDataset:
    """Shared ``validate`` over items that each name their files."""

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, index: int) -> SegmentationSample:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_item(self, index: int) -> None:
        self[index]

    def validate(self, max_errors: int = 20) -> None:
        """Read every item once; raise DatasetError listing each bad file (up to ``max_errors``)."""
        problems: list[str] = []
        for index in range(len(self)):
            try:
                self._check_item(index)
            except DatasetError as error:
                problems.append(str(error))
                if len(problems) >= max_errors:
                    break
        if problems:
            raise DatasetError(f"{len(problems)} bad item(s) in {self!r}:\n  " + "\n  ".join(problems))

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index % len(self)


class ImageMaskFolderDataset(_FileDataset):
    """Images in ``image_dir`` with one mask each in ``mask_dir``, matched by file stem.

    Masks are read as gray levels, foreground > 127 (DIS5K, ThinObject5K, COIFT and HRSOD all store
    0 / 255 PNGs). An image with no mask, or a mask with no image, is an error.
    """

    def __init__(self, image_dir: str | PathLike[str], mask_dir: str | PathLike[str], *, name: str | None = None):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder}")
        images = {p.stem: p for p in sorted(self.image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        masks = {p.stem: p for p in sorted(self.mask_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        unmatched = sorted(set(images) ^ set(masks))
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            raise DatasetError(
                f"{len(unmatched)} image(s)/mask(s) in {self.image_dir} and {self.mask_dir} have no partner "
                f"with the same file stem: {shown}"
            )
        self.items = [(images[stem], masks[stem]) for stem in sorted(images)]
        self.name = name or self.image_dir.parent.name

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.image_dir)!r}, {str(self.mask_dir)!r})"

    def __getitem__(self, index: int) -> SegmentationSample:
        image_path, mask_path = self.items[self._index(index)]
        image = read_rgb(image_path)
        mask = read_mask(mask_path)
        _check_same_size(image, mask, image_path, mask_path)
        return SegmentationSample(image, mask[None], image_path.stem)

    def _check_item(self, index: int) -> None:
        image_path, mask_path = self.items[index]
        image_size, mask_size = _image_size(image_path), _image_size(mask_path)
        if image_size != mask_size:
            raise DatasetError(
                f"mask {mask_path} has size (H, W) = {mask_size} but its image {image_path} has {image_size}"
            )


# Folder names (image folder, mask folder) of the HQ-SAM evaluation sets, first match wins.
HQ_DATASET_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "dis5k": (("im", "gt"),),
    "thinobject5k": (("images_test", "masks_test"), ("images", "masks")),
    "coift": (("images", "masks"),),
    "hrsod": (("images", "masks_max255"), ("images", "masks")),
}


def load_hq_dataset(kind: str, root: str | PathLike[str]) -> ImageMaskFolderDataset:
    """A DIS5K split folder (``DIS-VD/`` with ``im/`` and ``gt/``), ThinObject5K, COIFT or HRSOD root."""
    key = kind.lower().replace("-", "").replace("_", "")
    if key not in HQ_DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(HQ_DATASET_LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} folder not found: {root}")
    for image_folder, mask_folder in HQ_DATASET_LAYOUTS[key]:
        if (root / image_folder).is_dir() and (root / mask_folder).is_dir():
            return ImageMaskFolderDataset(root / image_folder, root / mask_folder, name=f"{key}:{root.name}")
    expected = " or ".join(f"{a}/ + {b}/" for a, b in HQ_DATASET_LAYOUTS[key])
    raise FileNotFoundError(f"{root} does not have the {kind} layout: expected {expected}")


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygon list, uncompressed RLE or compressed RLE) -> ``[H, W]`` bool."""
    from linmix.sam.automatic_mask_generator import rle_to_mask

    if isinstance(segmentation, dict):
        size = [int(s) for s in segmentation.get("size", ())]
        if size != [height, width]:
            raise DatasetError(f"{where}: RLE size {size} differs from the image size {[height, width]}")
        try:
            return rle_to_mask(segmentation)
        except (ValueError, KeyError) as error:
            raise DatasetError(f"{where}: bad RLE ({error})") from error
    if isinstance(segmentation, list):
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in segmentation:
            if len(polygon) < 6 or len(polygon) % 2:
                raise DatasetError(f"{where}: a polygon needs an even number (>= 6) of coordinates, got {len(polygon)}")
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
        return np.asarray(canvas, dtype=bool)
    raise DatasetError(f"{where}: segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")


class SA1BDataset(_FileDataset):
    """SA-1B: ``sa_<id>.jpg`` with ``sa_<id>.json`` in one folder; every annotation is a COCO RLE mask.

    ``max_masks`` keeps the first that many annotations of an image (the paper samples up to 60).
    """

    def __init__(self, folder: str | PathLike[str], *, max_masks: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"SA-1B folder not found: {self.folder}")
        self.items = []
        for json_path in sorted(self.folder.glob("*.json")):
            image_path = json_path.with_suffix(".jpg")
            if not image_path.is_file():
                raise DatasetError(f"annotation {json_path} has no image {image_path.name} beside it")
            self.items.append((image_path, json_path))
        if not self.items:
            raise FileNotFoundError(f"no SA-1B annotation files (sa_*.json) in {self.folder}")
        self.max_masks = max_masks
        self.name = f"sa1b:{self.folder.name}"

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r})"

    def __getitem__(self, index: int) -> SegmentationSample:
        image_path, json_path = self.items[self._index(index)]
        image = read_rgb(image_path)
        try:
            record = json.loads(json_path.read_text())
            annotations = record["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(f"cannot read SA-1B annotation {json_path}: {error}") from error
        height, width = image.shape[:2]
        info = record.get("image", {})
        if "height" in info and (int(info["height"]), int(info["width"])) != (height, width):
            raise DatasetError(
                f"{json_path} says the image is (H, W) = ({info['height']}, {info['width']}) but {image_path} "
                f"is ({height}, {width})"
            )
        annotations = annotations[: self.max_masks] if self.max_masks else annotations
        masks = [
            _decode_segmentation(a.get("segmentation"), height, width, f"{json_path} annotation {i}")
            for i, a in enumerate(annotations)
        ]
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return SegmentationSample(image, stacked, image_path.stem)


class CocoInstancesDataset(_FileDataset):
    """A COCO ``instances_*.json`` and its image folder; crowd annotations are skipped by default."""

    def __init__(
        self,
        annotation_file: str | PathLike[str],
        image_dir: str | PathLike[str],
        *,
        include_crowd: bool = False,
        max_masks: int | None = None,
    ):
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        try:
            data = json.loads(self.annotation_file.read_text())
            images = data["images"]
            annotations = data["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(f"{self.annotation_file} is not a COCO instances file ({error})") from error
        by_image: dict[int, list[dict]] = {}
        for annotation in annotations:
            if annotation.get("iscrowd", 0) and not include_crowd:
                continue
            by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
        # Images without any (non-crowd) annotation have nothing to prompt: left out.
        self.images = [image for image in images if int(image["id"]) in by_image]
        self.annotations = by_image
        self.max_masks = max_masks
        self.name = f"coco:{self.annotation_file.stem}"

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.annotation_file)!r}, {str(self.image_dir)!r})"

    def __getitem__(self, index: int) -> SegmentationSample:
        info = self.images[self._index(index)]
        image_path = self.image_dir / info["file_name"]
        image = read_rgb(image_path)
        height, width = image.shape[:2]
        if (int(info.get("height", height)), int(info.get("width", width))) != (height, width):
            raise DatasetError(
                f"{self.annotation_file} says image {info['id']} is (H, W) = ({info['height']}, {info['width']}) "
                f"but {image_path} is ({height}, {width})"
            )
        annotations = self.annotations[int(info["id"])]
        annotations = annotations[: self.max_masks] if self.max_masks else annotations
        masks = np.stack([
            _decode_segmentation(a["segmentation"], height, width, f"{self.annotation_file} annotation {a.get('id')}")
            for a in annotations
        ])
        return SegmentationSample(image, masks, Path(info["file_name"]).stem)


# --------------------------------------------------------------------------------------------------
# procedural high-quality data


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Smooth random field ``[H, W, channels]`` in about [-1, 1]: a cells x cells grid, upsampled
    bicubically to a quarter of the size, then bilinearly (bicubic at full size is slow on CPU)."""
    grid = torch.from_numpy(rng.uniform(-1, 1, size=(1, channels, cells, cells)).astype(np.float32))
    field = F.interpolate(grid, size=(max(cells, height // 4), max(cells, width // 4)), mode="bicubic", align_corners=True)
    field = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)
    return field[0].permute(1, 2, 0).numpy()


def _texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray, amplitude: float) -> np.ndarray:
    """A colour texture ``[H, W, 3]`` float around ``base``: smooth blotches, stripes and grain."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    texture = base[None, None, :] + amplitude * _smooth_noise(rng, height, width, int(rng.integers(3, 9)), 3)
    if rng.random() < 0.6:
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + rng.uniform(0, 6.3))
        texture = texture + (0.5 * amplitude * stripes)[..., None] * rng.uniform(-1, 1, size=3).astype(np.float32)
    return texture + 3.0 * rng.standard_normal(size=(height, width, 1), dtype=np.float32)


def _segment_distance(xx: np.ndarray, yy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of every (xx, yy) pixel centre to the segment a-b."""
    d = b - a
    length2 = float(d @ d)
    if length2 == 0:
        return np.hypot(xx - a[0], yy - a[1])
    t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(xx - (a[0] + t * d[0]), yy - (a[1] + t * d[1]))


def _stroke_field(height: int, width: int, segments: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Signed distance ``[H, W]`` (negative inside) of the union of thick segments (a, b, radius)."""
    field = np.full((height, width), np.inf, dtype=np.float32)
    for a, b, radius in segments:
        pad = radius + 2
        x0, x1 = int(max(0, math.floor(min(a[0], b[0]) - pad))), int(min(width, math.ceil(max(a[0], b[0]) + pad) + 1))
        y0, y1 = int(max(0, math.floor(min(a[1], b[1]) - pad))), int(min(height, math.ceil(max(a[1], b[1]) + pad) + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        distance = _segment_distance(xx, yy, a, b) - radius
        np.minimum(field[y0:y1, x0:x1], distance, out=field[y0:y1, x0:x1])
    return field


def _polyline(points: np.ndarray, radius: float | np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float32), (len(points),))
    return [(points[i], points[i + 1], float(radii[i])) for i in range(len(points) - 1)]


def _smooth_curve(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, wiggle: float, n: int = 40) -> np.ndarray:
    """A cubic Bezier from start to end with random control points: ``[n, 2]`` (x, y)."""
    direction = end - start
    normal = np.array([-direction[1], direction[0]])
    c1 = start + direction / 3 + normal * rng.uniform(-wiggle, wiggle)
    c2 = start + 2 * direction / 3 + normal * rng.uniform(-wiggle, wiggle)
    t = np.linspace(0, 1, n)[:, None]
    return ((1 - t) ** 3) * start + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * end


class ProceduralHQDataset:
    """Seeded synthetic high-quality segmentation data with exact masks.

    Each item is an image of random size (sides in ``[min_side, max_side]``, several aspect ratios)
    with ``min_objects..max_objects`` objects (default 1..3) of these kinds on a textured background: ``wire`` (thin smooth
    curves), ``frame`` (rectangular or round frames with holes, some with cross bars), ``tree``
    (branching strokes thinning outwards), ``text`` (rows of glyph-like strokes) and ``blob``
    (a wobbly disc with holes). Objects are anti-aliased into the image and may occlude each other;
    each object's mask is the exact set of pixels whose centre it covers (coverage >= 1/2) and that
    no later object covers. Item ``i`` is a pure function of ``(seed, i)``.
    """

    KINDS = ("wire", "frame", "tree", "text", "blob")

    def __init__(
        self,
        seed: int = 0,
        length: int = 1_000_000,
        *,
        min_side: int = 192,
        max_side: int = 448,
        max_objects: int = 3,
        min_objects: int = 1,
    ):
        if length < 1 or min_side < 64 or max_side < min_side or not 1 <= min_objects <= max_objects:
            raise ValueError(
                f"need length >= 1, 64 <= min_side <= max_side and 1 <= min_objects <= max_objects; got length={length}, "
                f"min_side={min_side}, max_side={max_side}, min_objects={min_objects}, max_objects={max_objects}"
            )
        self.seed, self.length = int(seed), int(length)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.name = f"procedural:seed{seed}"
        if (self.min_objects, self.max_objects) != (1, 3):
            self.name += f":objects={self.min_objects}-{self.max_objects}"

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, length={self.length})"

    def validate(self, max_errors: int = 20) -> None:
        """Nothing to check: generated data is always well-formed."""

    def __getitem__(self, index: int) -> SegmentationSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, 0x5A3])
        height = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
        width = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
        background_colour = rng.uniform(30, 225, size=3).astype(np.float32)
        image = _texture(rng, height, width, background_colour, amplitude=float(rng.uniform(10, 45)))
        masks: list[np.ndarray] = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            kind = self.KINDS[int(rng.integers(len(self.KINDS)))]
            field = getattr(self, f"_{kind}")(rng, height, width)
            coverage = np.clip(0.5 - field, 0.0, 1.0)[..., None]
            # A foreground colour well away from the background's, so the object is visible.
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            for _attempt in range(10):
                if np.abs(colour - background_colour).sum() >= 150:
                    break
                colour = rng.uniform(0, 255, size=3).astype(np.float32)
            foreground = _texture(rng, height, width, colour, amplitude=float(rng.uniform(5, 25)))
            image = image * (1 - coverage) + foreground * coverage
            mask = field <= 0
            masks = [m & ~mask for m in masks]
            masks.append(mask)
        minimum_area = max(20, int(0.001 * height * width))
        kept = [m for m in masks if int(m.sum()) >= minimum_area]
        if not kept:  # everything occluded or tiny: fall back to the largest remnant
            kept = [max(masks, key=lambda m: int(m.sum()))]
        image_uint8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        return SegmentationSample(image_uint8, np.stack(kept), f"procedural-{self.seed}-{index:07d}")

    # -- object kinds: each returns a signed distance field [H, W], negative inside --------------

    @staticmethod
    def _radius(rng: np.random.Generator, height: int, width: int, low: float, high: float) -> float:
        return float(rng.uniform(low, high) * max(height, width) / 384)

    def _wire(self, rng, height, width):
        segments = []
        for _ in range(int(rng.integers(1, 4))):
            start = rng.uniform([0, 0], [width, height])
            end = rng.uniform([0, 0], [width, height])
            if np.hypot(*(end - start)) < 0.3 * min(height, width):
                end = np.array([width, height]) - start
            curve = _smooth_curve(rng, start, end, wiggle=rng.uniform(0.1, 0.6))
            segments += _polyline(curve, self._radius(rng, height, width, 1.6, 4.0))
        return _stroke_field(height, width, segments)

    def _frame(self, rng, height, width):
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        half_w, half_h = rng.uniform(0.12, 0.35) * width, rng.uniform(0.12, 0.35) * height
        thickness = self._radius(rng, height, width, 3.0, 14.0)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(-0.5, 0.5)
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        if rng.random() < 0.5:  # rectangle (box signed distance)
            qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
            outer = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
        else:  # ellipse (approximate signed distance, exact on the axes)
            scale = min(half_w, half_h)
            outer = (np.hypot(u / half_w, v / half_h) - 1.0) * scale
        field = np.maximum(outer, -(outer + thickness))  # ring: inside outer, outside the inner offset
        if rng.random() < 0.5:  # cross bars splitting the hole
            bars = []
            for _ in range(int(rng.integers(1, 3))):
                if rng.random() < 0.5:
                    a, b = np.array([cx - half_w, cy + rng.uniform(-0.6, 0.6) * half_h]), None
                    b = np.array([cx + half_w, a[1]])
                else:
                    a = np.array([cx + rng.uniform(-0.6, 0.6) * half_w, cy - half_h])
                    b = np.array([a[0], cy + half_h])
                bars.append((a, b, thickness / 3))
            inside = outer <= 0
            bar_field = np.where(inside, _stroke_field(height, width, bars), np.inf)
            field = np.minimum(field, bar_field)
        return field

    def _tree(self, rng, height, width):
        segments = []
        root = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.75, 0.95) * height])
        base_radius = self._radius(rng, height, width, 3.0, 7.0)
        length = rng.uniform(0.2, 0.35) * min(height, width)

        def grow(start, angle, length, radius, depth):
            end = start + length * np.array([math.cos(angle), -math.sin(angle)])
            end = np.clip(end, [0, 0], [width - 1, height - 1])
            segments.append((start, end, radius))
            if depth == 0:
                return
            for _ in range(int(rng.integers(2, 4))):
                grow(end, angle + rng.uniform(-0.9, 0.9), length * rng.uniform(0.55, 0.8), max(radius * 0.7, 1.4), depth - 1)

        grow(root, math.pi / 2 + rng.uniform(-0.3, 0.3), length, base_radius, int(rng.integers(2, 4)))
        return _stroke_field(height, width, segments)

    def _text(self, rng, height, width):
        glyph_h = rng.uniform(0.08, 0.2) * height
        glyph_w = glyph_h * rng.uniform(0.5, 0.8)
        count = int(rng.integers(2, 7))
        x = rng.uniform(0.05, 0.4) * width
        y = rng.uniform(0.1, 0.9 - 0.2) * height
        radius = self._radius(rng, height, width, 1.8, 4.0)
        # Glyph strokes join points of a 3 x 3 grid (corners, edge midpoints, centre).
        grid = [(gx, gy) for gy in (0, 0.5, 1) for gx in (0, 0.5, 1)]
        segments = []
        for _ in range(count):
            if x + glyph_w > width:
                break
            for _ in range(int(rng.integers(2, 5))):
                i, j = rng.choice(len(grid), size=2, replace=False)
                a = np.array([x + grid[i][0] * glyph_w, y + grid[i][1] * glyph_h])
                b = np.array([x + grid[j][0] * glyph_w, y + grid[j][1] * glyph_h])
                segments.append((a, b, radius))
            x += glyph_w * rng.uniform(1.3, 1.7)
        return _stroke_field(height, width, segments)

    def _blob(self, rng, height, width):
        cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        radius = rng.uniform(0.1, 0.28) * min(height, width)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + sum(rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in range(2, 6))
        field = np.hypot(xx - cx, yy - cy) - radius * wobble
        for _ in range(int(rng.integers(1, 4))):  # holes
            hole_r = radius * rng.uniform(0.1, 0.25)
            offset = rng.uniform(0, 0.55) * radius
            theta = rng.uniform(0, 2 * math.pi)
            hx, hy = cx + offset * math.cos(theta), cy + offset * math.sin(theta)
            field = np.maximum(field, -(np.hypot(xx - hx, yy - hy) - hole_r))
        return field


# --------------------------------------------------------------------------------------------------
# prompts


def tight_box(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool -> ``[4]`` float XYXY of the extreme foreground pixels (inclusive, SAM's convention)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def default_box_noise_cap(image_size: int) -> float:
    """SAM's box-noise cap (20 px in a 1024 px frame) scaled to a ``image_size`` frame."""
    return 20.0 * image_size / 1024


def sample_box_prompt(
    mask: np.ndarray, rng: np.random.Generator, *, noise: float = 0.1, max_noise: float = 20.0
) -> np.ndarray:
    """The tight box of ``mask`` with each edge moved by N(0, noise * side), capped at ``max_noise``
    pixels, kept inside the image and non-inverted: ``[4]`` XYXY float."""
    box = tight_box(mask)
    height, width = mask.shape
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32)
    jitter = np.clip(rng.normal(0, 1, size=4) * noise * sides, -max_noise, max_noise)
    noisy = box + jitter.astype(np.float32)
    noisy[[0, 2]] = np.clip(noisy[[0, 2]], 0, width - 1)
    noisy[[1, 3]] = np.clip(noisy[[1, 3]], 0, height - 1)
    x0, x1 = sorted(noisy[[0, 2]])
    y0, y1 = sorted(noisy[[1, 3]])
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sample_point_prompt(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    max_positive: int = 5,
    max_negative: int = 2,
    negative_probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """1..max_positive points on foreground pixels and, with ``negative_probability``, 1..max_negative
    points on background pixels near the object (inside its box grown by half): -> coords ``[N, 2]``
    (x, y) float pixel indices, labels ``[N]`` int (1 positive, 0 negative)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot place points in an empty mask")
    n_positive = int(rng.integers(1, max_positive + 1))
    chosen = rng.choice(len(xs), size=n_positive, replace=len(xs) < n_positive)
    coords = [np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32)]
    labels = [np.ones(n_positive, dtype=np.int64)]
    if max_negative > 0 and rng.random() < negative_probability:
        x0, y0, x1, y1 = tight_box(mask)
        grow_x, grow_y = 0.5 * (x1 - x0) + 2, 0.5 * (y1 - y0) + 2
        height, width = mask.shape
        region = np.zeros_like(mask)
        region[int(max(0, y0 - grow_y)) : int(min(height, y1 + grow_y + 1)), int(max(0, x0 - grow_x)) : int(min(width, x1 + grow_x + 1))] = True
        ny, nx = np.nonzero(region & ~mask)
        if len(nx):
            n_negative = int(rng.integers(1, max_negative + 1))
            chosen = rng.choice(len(nx), size=n_negative, replace=len(nx) < n_negative)
            coords.append(np.stack([nx[chosen], ny[chosen]], axis=1).astype(np.float32))
            labels.append(np.zeros(n_negative, dtype=np.int64))
    return np.concatenate(coords), np.concatenate(labels)


# --------------------------------------------------------------------------------------------------
# frames and augmentation


def prepare_image(image: torch.Tensor, frame: int) -> torch.Tensor:
    """``[3, h, w]`` float 0-255 with h, w <= frame -> ``[3, frame, frame]`` normalised with SAM's
    pixel mean / std and zero-padded at the bottom and right (the model's own preprocessing)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    normalised = (image.float() - mean) / std
    return F.pad(normalised, (0, frame - image.shape[-1], 0, frame - image.shape[-2]))


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def augment_sample(
    sample: SegmentationSample,
    rng: np.random.Generator,
    *,
    frame: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_probability: float = 0.5,
    min_area: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, large-scale jitter and crop/pad into the square model frame.

    The image is scaled by ``s * frame / max(H, W)`` with ``s`` log-uniform in ``scale_range``, then
    randomly cropped to ``frame`` where larger, and padded at the bottom/right. ``scale_range=(1, 1)``
    and ``flip_probability=0`` give SAM's plain resize-longest-side. Objects left with fewer than
    ``min_area`` pixels are dropped (a crop may remove them); if every object would go, the sample is
    taken without jitter (and if they are all that small anyway, the largest one is kept).

    Returns: image ``[3, frame, frame]`` normalised (see :func:`prepare_image`), masks ``[K', frame, frame]``
    float in [0, 1] (area-resampled, so edges are soft; threshold at 0.5 for binary masks).
    """
    image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()
    masks = torch.from_numpy(np.ascontiguousarray(sample.masks)).float()
    if rng.random() < flip_probability:
        image, masks = image.flip(-1), masks.flip(-1)
    height, width = image.shape[-2:]
    low, high = scale_range
    jitter = float(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else float(low)
    for scale in (jitter, 1.0):
        factor = scale * frame / max(height, width)
        size = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
        top = int(rng.integers(0, size[0] - frame + 1)) if size[0] > frame else 0
        left = int(rng.integers(0, size[1] - frame + 1)) if size[1] > frame else 0
        crop = (slice(top, top + frame), slice(left, left + frame))
        resized_masks = _resize(masks, size)[:, crop[0], crop[1]]
        areas = (resized_masks > 0.5).flatten(1).sum(1)
        keep = areas >= min_area
        if keep.any():
            break
    if not keep.any():  # every object is small at this frame size: keep the largest one that is visible
        if int(areas.max()) == 0:
            raise DatasetError(f"{sample.name}: no object is visible after resizing to a {frame} px frame")
        keep = areas == areas.max()
    resized_image = _resize(image, size)[:, crop[0], crop[1]]
    out_h, out_w = resized_image.shape[-2:]
    resized_masks = F.pad(resized_masks[keep], (0, frame - out_w, 0, frame - out_h))
    return prepare_image(resized_image, frame), resized_masks


# --------------------------------------------------------------------------------------------------
# batch sources for linmix.training.Trainer


class PromptBatchSource:
    """Stage-2 batches addressed by ``(step, micro_step, rank, world_size)``, as the Trainer needs.

    Sample position ``p = ((step * grad_accum + micro_step) * world_size + rank) * batch_size + j`` is
    item ``p`` of an infinite (procedural) dataset, or item ``permutation_e[p % n]`` of a finite one
    (a fresh seeded permutation each epoch ``e = p // n``). All randomness of a sample (augmentation,
    which objects, prompts) comes from a generator seeded with ``(seed, p)``, so a batch is a pure
    function of its indices and a resumed run sees the same data.

    Images at even positions get box prompts, odd ones point prompts (both kinds in every batch of
    an even size). A batch is a dict:

    - ``images`` ``[B, 3, S, S]`` normalised and padded; ``masks`` ``[B, K, S, S]`` float targets;
    - ``boxes`` ``[B, K, 4]`` XYXY in the frame; ``point_coords`` ``[B, K, P, 2]``, ``point_labels``
      ``[B, K, P]`` (1 / 0, -1 = padding); ``is_box`` ``[B]`` bool.
    """

    def __init__(
        self,
        dataset: Sequence[SegmentationSample],
        *,
        batch_size: int,
        image_size: int,
        prompts_per_image: int = 2,
        grad_accum: int = 1,
        seed: int = 0,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        max_positive: int = 5,
        max_negative: int = 2,
        box_noise: float = 0.1,
        box_noise_cap: float | None = None,
    ):
        if batch_size < 1 or prompts_per_image < 1 or grad_accum < 1:
            raise ValueError("batch_size, prompts_per_image and grad_accum must be >= 1")
        if box_noise < 0 or (box_noise_cap is not None and box_noise_cap < 0):
            raise ValueError(f"box_noise and box_noise_cap must be >= 0, got {box_noise} and {box_noise_cap}")
        self.dataset = dataset
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.prompts_per_image, self.grad_accum, self.seed = int(prompts_per_image), int(grad_accum), int(seed)
        self.augment, self.scale_range = augment, tuple(scale_range)
        self.max_positive, self.max_negative = int(max_positive), int(max_negative)
        self.max_points = self.max_positive + self.max_negative
        # SAM caps the box-edge noise at 20 px in its 1024 px frame; the same fraction of our frame
        # keeps a box as informative at 256 px (a 20 px cap there blurs which object the box bounds).
        self.box_noise = float(box_noise)
        self.box_noise_cap = default_box_noise_cap(self.image_size) if box_noise_cap is None else float(box_noise_cap)

    def _item(self, position: int) -> SegmentationSample:
        n = len(self.dataset)
        if isinstance(self.dataset, ProceduralHQDataset):
            return self.dataset[position % n]
        epoch, offset = divmod(position, n)
        permutation = np.random.default_rng([self.seed, epoch, 0x9E3]).permutation(n)
        return self.dataset[int(permutation[offset])]

    def sample(self, position: int, is_box: bool) -> dict[str, torch.Tensor]:
        """One image's training record at sample position ``position``.

        An item whose objects all vanish at this frame size (thin wires in a tiny frame) is replaced
        by the item a fixed stride further on, so the batch stays a pure function of its indices.
        """
        scale_range = self.scale_range if self.augment else (1.0, 1.0)
        for attempt in range(20):
            lookup = position + attempt * 1_000_003
            rng = np.random.default_rng([self.seed, lookup, 0x71])
            sample = self._item(lookup)
            if sample.masks.shape[0] == 0 or not sample.masks.any():
                raise DatasetError(f"{sample.name} has no non-empty mask to prompt")
            try:
                image, masks = augment_sample(
                    sample, rng, frame=self.image_size, scale_range=scale_range, flip_probability=0.5 if self.augment else 0.0
                )
                break
            except DatasetError:
                continue
        else:
            raise DatasetError(f"no object stays visible in a {self.image_size} px frame (20 items tried from position {position})")
        k = self.prompts_per_image
        chosen = rng.choice(masks.shape[0], size=k, replace=masks.shape[0] < k)
        targets = masks[torch.from_numpy(chosen)]
        boxes = torch.zeros(k, 4)
        coords = torch.zeros(k, self.max_points, 2)
        labels = torch.full((k, self.max_points), -1, dtype=torch.int64)
        for i in range(k):
            binary = (targets[i] > 0.5).numpy()
            if is_box:
                boxes[i] = torch.from_numpy(sample_box_prompt(binary, rng, noise=self.box_noise, max_noise=self.box_noise_cap))
            else:
                point_xy, point_labels = sample_point_prompt(
                    binary, rng, max_positive=self.max_positive, max_negative=self.max_negative
                )
                coords[i, : len(point_xy)] = torch.from_numpy(point_xy)
                labels[i, : len(point_labels)] = torch.from_numpy(point_labels)
        return {"images": image, "masks": targets, "boxes": boxes, "point_coords": coords, "point_labels": labels}

    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro_step) * world_size + rank) * self.batch_size
        is_box = [(first + j) % 2 == 0 for j in range(self.batch_size)]
        records = [self.sample(first + j, is_box=is_box[j]) for j in range(self.batch_size)]
        batch = {key: torch.stack([r[key] for r in records]) for key in records[0]}
        batch["is_box"] = torch.tensor(is_box)
        return batch


class TeacherFeatureBatchSource:
    """Stage-1 (distillation) batches: images and the teacher's embeddings written by
    ``linmix sam dump-teacher`` (:func:`linmix.sam.train.dump_teacher_features`).

    ``folder/index.json`` lists ``{"name", "image", "features"}`` records; each ``features`` file is a
    safetensors with ``embedding`` ``[256, g, g]`` of the image resized (longest side) and padded to the
    teacher's input size. Batches: ``images`` ``[B, 3, S, S]`` (the same resize-and-pad at the student's
    size S) and ``teacher`` ``[B, 256, g, g]``. Positions map to items as in :class:`PromptBatchSource`.
    """

    def __init__(self, folder: str | PathLike[str], *, batch_size: int, image_size: int, grad_accum: int = 1, seed: int = 0):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"teacher feature index not found: {index_path} (write it with `linmix sam dump-teacher`)"
            )
        self.records = json.loads(index_path.read_text())["items"]
        if not self.records:
            raise ValueError(f"{index_path} lists no items")
        missing = [r["features"] for r in self.records if not (self.folder / r["features"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} teacher feature file(s) missing in {self.folder}, e.g. {missing[0]}")
        self.batch_size, self.image_size, self.grad_accum, self.seed = int(batch_size), int(image_size), int(grad_accum), int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def item(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        record = self.records[index]
        image = read_rgb(self.folder / record["image"]) if not Path(record["image"]).is_absolute() else read_rgb(record["image"])
        tensor = torch.from_numpy(image).permute(2, 0, 1).float()
        height, width = tensor.shape[-2:]
        scale = self.image_size / max(height, width)
        tensor = _resize(tensor, (int(height * scale + 0.5), int(width * scale + 0.5)))
        teacher = load_file(str(self.folder / record["features"]))["embedding"].float()
        return {"images": prepare_image(tensor, self.image_size), "teacher": teacher}

    def get(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro_step) * world_size + rank) * self.batch_size
        n = len(self.records)
        items = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, n)
            permutation = np.random.default_rng([self.seed, epoch, 0x9E3]).permutation(n)
            items.append(self.item(int(permutation[offset])))
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _procedural_from_spec(spec: str, rest: str) -> ProceduralHQDataset:
    usage = f"procedural dataset spec must be procedural:SEED[:LENGTH][:objects=MIN-MAX], got {spec!r}"
    parts = rest.split(":")
    objects: dict[str, int] = {}  # empty: the generator's default count
    if parts[-1].startswith("objects="):
        low, _, high = parts.pop()[len("objects="):].partition("-")
        try:
            objects = {"min_objects": int(low), "max_objects": int(high or low)}
        except ValueError as error:
            raise ValueError(usage) from error
        if not 1 <= objects["min_objects"] <= objects["max_objects"]:
            raise ValueError(f"objects=MIN-MAX needs 1 <= MIN <= MAX, got {spec!r}")
    if not 1 <= len(parts) <= 2:
        raise ValueError(usage)
    try:
        seed = int(parts[0])
        length = int(parts[1]) if len(parts) > 1 else 1_000_000
    except ValueError as error:
        raise ValueError(usage) from error
    return ProceduralHQDataset(seed, length, **objects)


def load_dataset(spec: str) -> Any:
    """A dataset from a command-line spec ``KIND:PATH[:PATH2]`` or ``procedural:SEED[:LENGTH][:objects=MIN-MAX]``.

    KIND is one of dis5k, thinobject5k, coift, hrsod (a folder), sa1b (a folder), coco
    (``coco:ANNOTATIONS.json:IMAGE_DIR``), folder (``folder:IMAGE_DIR:MASK_DIR``) or procedural.
    ``objects=2-4`` (or ``objects=3``) sets how many objects each procedural image has (default 1-3).
    """
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if not rest:
        raise ValueError(f"dataset spec {spec!r} must be KIND:PATH (e.g. dis5k:data/DIS5K/DIS-VD, procedural:1)")
    if kind == "procedural":
        return _procedural_from_spec(spec, rest)
    if kind == "sa1b":
        return SA1BDataset(rest)
    if kind in ("coco", "folder"):
        first, sep, second = rest.rpartition(":")
        if not sep:
            raise ValueError(f"{kind} dataset spec must be {kind}:FIRST_PATH:SECOND_PATH, got {spec!r}")
        return CocoInstancesDataset(first, second) if kind == "coco" else ImageMaskFolderDataset(first, second)
    return load_hq_dataset(kind, rest)

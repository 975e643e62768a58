"""Dataset formats on disk: the high-quality benchmark folders, SA-1B and COCO instances.

Every dataset is a sequence of :class:`SegmentationSample` (``image`` HxWx3 uint8 RGB, ``masks``
KxHxW bool, one per object, ``name``):

- :class:`ImageMaskFolderDataset` (and :func:`load_hq_dataset` for the named layouts): DIS5K
  (``im/`` + ``gt/``), ThinObject5K (``images_test/`` + ``masks_test/``, or ``images/`` + ``masks/``),
  COIFT (``images/`` + ``masks/``), HRSOD (``images/`` + ``masks_max255/``, or ``masks/``): one
  mask per image, matched by file stem, foreground = mask value > 127.
- :class:`SA1BDataset`: ``sa_*.jpg`` beside ``sa_*.json`` (``annotations[*].segmentation`` in COCO RLE).
- :class:`CocoInstancesDataset`: a COCO ``instances_*.json`` (polygons, RLE or compressed RLE) and
  its image folder.

Images and masks are read upright (EXIF orientation applied) by :mod:`linmix.utils.images`. A
corrupt image or a mask whose size differs from its image raises :class:`DatasetError` naming the
file; ``validate()`` checks every item up front so a bad file stops a run before step 1, not in epoch 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from linmix.sam.mask_utils import rle_to_mask
from linmix.utils import images

__all__ = [
    "HQ_DATASET_LAYOUTS",
    "IMAGE_EXTENSIONS",
    "CocoInstancesDataset",
    "DatasetError",
    "ImageMaskFolderDataset",
    "SA1BDataset",
    "SegmentationSample",
    "load_hq_dataset",
    "read_mask",
    "read_rgb",
]

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


def read_rgb(path: str | PathLike[str]) -> np.ndarray:
    """An image file -> ``[H, W, 3]`` uint8 RGB, upright (:func:`linmix.utils.images.read_rgb`); a file
    Pillow cannot read raises DatasetError naming it."""
    try:
        return images.read_rgb(path)
    except images.UnreadableImageError as error:
        raise DatasetError(str(error)) from error


def read_mask(path: str | PathLike[str]) -> np.ndarray:
    """A mask image -> ``[H, W]`` bool, upright like its image: foreground where the grey level
    (Pillow's luma for colour masks) exceeds 127. A 16-bit mask is compared in its own units, so 0 / 255
    and 0 / 65535 masks both read as meant."""
    try:
        with images.open_image(path) as image:
            turned = images.upright(image)
            if turned.mode in images.SIXTEEN_BIT_MODES:
                return np.asarray(turned) > 127
            return np.asarray(turned.convert("L"), dtype=np.uint8) > 127
    except images.UnreadableImageError as error:
        raise DatasetError(str(error)) from error


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file as read, decoding it fully so truncated files are caught."""
    try:
        return images.image_size(path)
    except images.UnreadableImageError as error:
        raise DatasetError(str(error)) from error


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

"""Copy-paste segmentation data: real cut-outs (exact alpha masks) pasted onto real photographs.

A :class:`CopyPasteDataset` item is a random crop of a background photograph (random scale, flip and
colour jitter) with several cut-outs pasted on it, each randomly scaled (small to large), rotated,
stretched, colour-jittered, sometimes blurred and given a soft shadow; later cut-outs occlude earlier
ones. An object's mask is its VISIBLE part: its own alpha > 127 minus every later cut-out's alpha > 127.
An object whose visible part falls below ``min_visible`` of its pasted area is dropped (its pixels stay
in the image as clutter). Items are :class:`linmix.sam.data.SegmentationSample` and a pure function of
``(seed, index, split)``, like :class:`linmix.sam.data.ProceduralHQDataset`, so :class:`PromptBatchSource`
and ``linmix sam eval`` take them as they are.

Sources (any user's files; nothing is shipped):

- ``backgrounds``: folders searched recursively for photographs (``.jpg .jpeg .png .webp .bmp .tif``).
- ``objects``: folders searched recursively for RGBA cut-outs; the alpha channel is the mask. Files
  without an alpha channel are skipped; one whose alpha is empty or covers almost all of it (no
  silhouette) is skipped when first drawn.
- ``emoji``: a colour emoji font (Noto Color Emoji), rendered glyph by glyph with Pillow at the font's
  bitmap size (109); the glyph list comes from the font's character map (fontTools).

Held-out split: every background and every cut-out belongs to exactly one split, decided by a stable
hash (SHA-1) of its key: ``int(sha1(key)[:8], 16) % heldout_every == 0`` is held out (1 in 8 by
default). A file's key is its path relative to its source folder with the stem normalised so that
variants of one picture share it (lower case; size folders such as ``16x16/``, ``48/`` or
``scalable/`` of icon themes left out; a trailing resolution such as ``_3840x2160`` and a trailing
``-l``/``-d``/``-light``/``-dark``/``-day``/``-night``/``-rtl``/``-ltr`` removed); an emoji's key is
``emoji:U+XXXX``. So ``split=heldout`` shares no photograph and no cut-out with ``split=train``.

Spec (``linmix sam eval --dataset`` / ``train``, once wired into ``load_dataset``)::

    copypaste:SEED[:LENGTH][:key=value...]

with keys ``backgrounds=DIR[,DIR]``, ``objects=DIR[,DIR]``, ``emoji=FONT|none``,
``split=train|heldout``, ``per_image=MIN-MAX`` (objects per image, default 1-4), ``size=MIN-MAX``
(image sides, default 192-448), ``procedural=SHARE`` (share of items taken from
:class:`ProceduralHQDataset` instead, default 0), ``min_visible=FRACTION`` (default 0.3) and
``heldout_every=N`` (default 8). Without ``backgrounds`` the installed Debian wallpapers are used
(``/usr/share/backgrounds``, ``/usr/share/wallpapers``); without ``objects`` and ``emoji`` the
installed Noto Color Emoji font (``tools/install_sam_sources.sh`` installs both).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from linmix.sam.data.formats import DatasetError, SegmentationSample
from linmix.sam.data.procedural import GeneratedDataset, ProceduralHQDataset

__all__ = [
    "BACKGROUND_EXTENSIONS",
    "DEFAULT_BACKGROUND_DIRS",
    "DEFAULT_EMOJI_FONTS",
    "CopyPasteDataset",
    "Cutout",
    "Placement",
    "compose_cutouts",
    "from_spec",
    "split_of",
    "source_key",
]

BACKGROUND_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_BACKGROUND_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
DEFAULT_EMOJI_FONTS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",)
EMOJI_BITMAP_SIZE = 109  # Noto Color Emoji's only bitmap strike
SPLITS = ("train", "heldout")
_INSTALL_HINT = "run tools/install_sam_sources.sh (apt-get install -y mate-backgrounds fonts-noto-color-emoji)"
# Characters of an emoji font that are not pictures on their own: joiners, variation selectors,
# the keycap combiner, tag characters.
_NON_PICTURE = {0x200D, 0x20E3, 0xFE0E, 0xFE0F} | set(range(0xE0020, 0xE0080))


# --------------------------------------------------------------------------------------------------
# split by stable hash


_RESOLUTION_SUFFIX = re.compile(r"[_-]\d{2,5}x\d{2,5}$")
_VARIANT_SUFFIX = re.compile(r"[_-](l|d|light|dark|day|night|rtl|ltr)$")
_SIZE_FOLDER = re.compile(r"^(\d{1,4}(x\d{1,4})?(@\d+x?)?|scalable)$")  # icon themes: 16x16/, 32x32@2x/, 48/


def source_key(path: str | PathLike[str], root: str | PathLike[str]) -> str:
    """The split key of a file: its path relative to ``root``, lower-cased, without size folders
    (``16x16/``, ``48/``, ``scalable/``) and with the stem stripped of a resolution suffix and a
    light/dark/left-to-right variant suffix, so every version of one picture or icon shares it."""
    relative = Path(path).relative_to(root)
    folders = [part.lower() for part in relative.parent.parts if not _SIZE_FOLDER.match(part.lower())]
    stem = relative.stem.lower()
    stem = _RESOLUTION_SUFFIX.sub("", stem)
    stem = _VARIANT_SUFFIX.sub("", stem)
    return "/".join([*folders, stem])


def split_of(key: str, heldout_every: int = 8) -> str:
    """``"heldout"`` for 1 in ``heldout_every`` keys (stable SHA-1 hash), else ``"train"``."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if digest % heldout_every == 0 else "train"


# --------------------------------------------------------------------------------------------------
# compositing (pure numpy; the part the tests check against known geometry)


@dataclass
class Cutout:
    """An RGBA cut-out ``[h, w, 4]`` uint8 (alpha = coverage) and the key it came from."""

    rgba: np.ndarray
    key: str


@dataclass
class Placement:
    """Where a (transformed) cut-out went: ``rgba`` pasted with its top-left corner at (top, left),
    which may lie outside the canvas. Filled by :func:`compose_cutouts`: ``full`` (its alpha > 127 on
    the canvas), ``visible`` (``full`` minus later cut-outs), ``visible_fraction`` and ``kept``."""

    rgba: np.ndarray
    top: int
    left: int
    key: str = ""
    shadow: tuple[int, int, float, float] | None = None  # (dy, dx, blur radius, opacity)
    full: np.ndarray | None = None
    visible: np.ndarray | None = None
    visible_fraction: float = 0.0
    kept: bool = False


def _canvas_window(height: int, width: int, top: int, left: int, h: int, w: int):
    """Slices (canvas, cut-out) of the overlap of an h x w cut-out at (top, left) with the canvas."""
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def _blur(array: np.ndarray, radius: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    if radius <= 0:
        return array
    return np.asarray(Image.fromarray(array).filter(ImageFilter.GaussianBlur(radius)))


def compose_cutouts(
    background: np.ndarray, placements: Sequence[Placement], *, min_visible: float = 0.3, min_area: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``placements`` in order onto ``background`` ``[H, W, 3]`` uint8 (alpha blending, optional
    soft shadow first) -> (image ``[H, W, 3]`` uint8, masks ``[K, H, W]`` bool of the kept objects).

    An object's mask is its alpha > 127 minus that of every later cut-out; it is kept when its visible
    area is at least ``min_area`` pixels and ``min_visible`` of its area on the canvas. The placements
    are updated in place (``full``, ``visible``, ``visible_fraction``, ``kept``).
    """
    height, width = background.shape[:2]
    image = background.astype(np.float32)
    for placement in placements:
        rgba = placement.rgba
        h, w = rgba.shape[:2]
        placement.full = np.zeros((height, width), dtype=bool)
        if placement.shadow is not None:
            dy, dx, radius, opacity = placement.shadow
            pad = int(math.ceil(2 * radius)) + 1
            alpha = np.pad(rgba[..., 3], pad)
            soft = _blur(alpha, radius).astype(np.float32) / 255.0 * opacity
            window = _canvas_window(height, width, placement.top + dy - pad, placement.left + dx - pad, *soft.shape)
            if window is not None:
                canvas, local = window
                image[canvas] *= 1.0 - soft[local][..., None]
        window = _canvas_window(height, width, placement.top, placement.left, h, w)
        if window is None:
            continue
        canvas, local = window
        alpha = rgba[local][..., 3:4].astype(np.float32) / 255.0
        image[canvas] = image[canvas] * (1.0 - alpha) + rgba[local][..., :3].astype(np.float32) * alpha
        placement.full[canvas] = rgba[local][..., 3] > 127
    covered = np.zeros((height, width), dtype=bool)
    for placement in reversed(placements):  # the last pasted is on top
        placement.visible = placement.full & ~covered
        covered |= placement.full
        area = int(placement.full.sum())
        visible = int(placement.visible.sum())
        placement.visible_fraction = visible / area if area else 0.0
        placement.kept = visible >= min_area and placement.visible_fraction >= min_visible
    masks = [p.visible for p in placements if p.kept]
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), stacked


# --------------------------------------------------------------------------------------------------
# sources


def _existing_dirs(paths: Sequence[str | PathLike[str]] | str | PathLike[str] | None, what: str) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, PathLike)):
        paths = [paths]
    folders = [Path(p) for p in paths]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {folder}")
    return folders


def _files(folders: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(root, file) of every image file under ``folders``, sorted, recursively."""
    found = []
    for root in folders:
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in BACKGROUND_EXTENSIONS and path.is_file():
                found.append((root, path))
    return found


def _has_alpha_channel(path: Path) -> bool:
    """From the file header only (cheap): does the image carry transparency?"""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    except (UnidentifiedImageError, OSError):
        return False


def _emoji_codepoints(font_path: Path) -> list[int]:
    """Characters of a colour emoji font that are pictures on their own (from its character map)."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError as error:  # pragma: no cover - fontTools comes with matplotlib
        raise DatasetError(f"reading the glyph list of {font_path} needs fontTools: pip install fonttools") from error
    try:
        font = TTFont(str(font_path), lazy=True)
        cmap = font.getBestCmap() or {}
    except Exception as error:  # fontTools raises many kinds on a non-font file
        raise DatasetError(f"cannot read the font {font_path}: {error}") from error
    return sorted(cp for cp in cmap if cp >= 0xA0 and cp not in _NON_PICTURE and not 0x1F1E6 <= cp <= 0x1F1FF)


class _LRU:
    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


_CUTOUT_CACHE = _LRU(512)
_BACKGROUND_CACHE = _LRU(16)
_FONT_CACHE = _LRU(4)
_MAX_CUTOUT_SIDE = 512
_MAX_BACKGROUND_SIDE = 1280


def _alpha_bbox_crop(rgba: np.ndarray) -> np.ndarray | None:
    """Crop to the alpha's bounding box; None when the alpha is no silhouette (empty, or opaque
    over nearly all of the image, or a sliver)."""
    opaque = rgba[..., 3] > 127
    count = int(opaque.sum())
    if count < 64 or count > 0.97 * opaque.size:
        return None
    ys, xs = np.nonzero(rgba[..., 3])
    return np.ascontiguousarray(rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def _load_cutout_file(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if max(rgba.size) > _MAX_CUTOUT_SIDE:
        scale = _MAX_CUTOUT_SIDE / max(rgba.size)
        rgba = rgba.convert("RGBa").resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.BILINEAR).convert("RGBA")
    return _alpha_bbox_crop(np.asarray(rgba))


def _render_emoji(font_path: Path, codepoint: int) -> np.ndarray | None:
    from PIL import Image, ImageDraw, ImageFont

    font = _FONT_CACHE.get(str(font_path), lambda: ImageFont.truetype(str(font_path), EMOJI_BITMAP_SIZE))
    canvas = Image.new("RGBA", (2 * EMOJI_BITMAP_SIZE, 2 * EMOJI_BITMAP_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((EMOJI_BITMAP_SIZE // 4, EMOJI_BITMAP_SIZE // 4), chr(codepoint), font=font, embedded_color=True)
    return _alpha_bbox_crop(np.asarray(canvas))


def _load_background(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (_MAX_BACKGROUND_SIDE, _MAX_BACKGROUND_SIDE))  # JPEG: decode at a reduced scale
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"cannot read background image {path}: {error}") from error
    if max(rgb.size) > _MAX_BACKGROUND_SIDE:
        scale = _MAX_BACKGROUND_SIDE / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    return np.asarray(rgb)


# --------------------------------------------------------------------------------------------------
# the dataset


class CopyPasteDataset(GeneratedDataset):
    """Cut-outs pasted onto photographs with exact visible masks (see the module docstring).

    Args:
        seed, length: item ``i`` is a pure function of ``(seed, i, split)``; ``length`` items.
        backgrounds: folder(s) of photographs; default: the installed Debian wallpaper folders.
        objects: folder(s) of RGBA cut-outs. emoji: a colour emoji font file, or ``"none"``.
            With neither given, the installed Noto Color Emoji font.
        split: ``"train"`` or ``"heldout"`` (disjoint photographs and cut-outs, 1 in ``heldout_every``).
        min_objects, max_objects: cut-outs pasted per image.
        min_side, max_side: image sides (multiples of 16 in this range).
        procedural_share: share of items taken from :class:`ProceduralHQDataset` (same seed) instead.
        min_visible: drop an object whose visible part is below this share of its pasted area.
        augment: random rotation, stretch, flip, colour jitter, blur and shadow of the cut-outs and
            colour jitter / flip of the background; ``False`` pastes them as they are (only scaled).
    """

    def __init__(
        self,
        seed: int = 0,
        length: int = 1_000_000,
        *,
        backgrounds: Sequence[str | PathLike[str]] | str | PathLike[str] | None = None,
        objects: Sequence[str | PathLike[str]] | str | PathLike[str] | None = None,
        emoji: str | PathLike[str] | None = None,
        split: str = "train",
        min_objects: int = 1,
        max_objects: int = 4,
        min_side: int = 192,
        max_side: int = 448,
        procedural_share: float = 0.0,
        min_visible: float = 0.3,
        heldout_every: int = 8,
        augment: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._set_draws(seed, length, min_side, max_side, min_objects, max_objects, smallest_side=32)
        if not 0.0 <= procedural_share <= 1.0 or not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"procedural_share and min_visible must be in [0, 1], got {procedural_share} and {min_visible}")
        self.split = split
        self.procedural_share, self.min_visible = float(procedural_share), float(min_visible)
        self.heldout_every, self.augment = int(heldout_every), bool(augment)
        split_of("", self.heldout_every)  # validates heldout_every

        # Backgrounds: grouped by split key (all versions of one picture in one group).
        if backgrounds is None:
            background_dirs = [Path(p) for p in DEFAULT_BACKGROUND_DIRS if Path(p).is_dir()]
            if not background_dirs:
                raise FileNotFoundError(
                    f"no background photographs: none of {', '.join(DEFAULT_BACKGROUND_DIRS)} exists; {_INSTALL_HINT}, "
                    "or pass backgrounds=DIR (any folder of JPEG/PNG/WebP photographs)"
                )
        else:
            background_dirs = _existing_dirs(backgrounds, "background")
        groups: dict[str, list[Path]] = {}
        for root, path in _files(background_dirs):
            groups.setdefault(f"{root.as_posix()}::{source_key(path, root)}", []).append(path)
        if not groups:
            raise FileNotFoundError(f"no photographs ({', '.join(BACKGROUND_EXTENSIONS)}) under {', '.join(map(str, background_dirs))}")
        # The split key leaves out the root folder, so the same file under two roots stays in one split.
        chosen = [
            (key.split("::", 1)[1], min(paths, key=lambda p: p.stat().st_size))  # the smallest version: fastest to decode
            for key, paths in sorted(groups.items())
            if split_of(key.split("::", 1)[1], self.heldout_every) == split
        ]
        self.background_keys = [key for key, _ in chosen]
        self.backgrounds = [path for _, path in chosen]
        if not self.backgrounds:
            raise DatasetError(f"no background photograph falls in the {split} split of {len(groups)} under {', '.join(map(str, background_dirs))}")

        # Cut-outs: RGBA files and/or emoji glyphs, each a list of (key, loader argument).
        if objects is None and emoji is None:
            emoji = next((p for p in DEFAULT_EMOJI_FONTS if Path(p).is_file()), None)
            if emoji is None:
                raise FileNotFoundError(
                    f"no cut-outs: the emoji font {DEFAULT_EMOJI_FONTS[0]} is not installed; {_INSTALL_HINT}, "
                    "or pass objects=DIR (a folder of RGBA PNG/WebP cut-outs) or emoji=FONT"
                )
        self.object_files: list[tuple[str, Path]] = []
        object_dirs = _existing_dirs(objects, "objects")
        if object_dirs:
            files = _files(object_dirs)
            if not files:
                raise FileNotFoundError(f"no images under the objects folder(s) {', '.join(map(str, object_dirs))}")
            # One file per key: the largest version of an icon drawn at several sizes.
            by_key: dict[str, Path] = {}
            for root, path in files:
                key = source_key(path, root)
                if key not in by_key or path.stat().st_size > by_key[key].stat().st_size:
                    by_key[key] = path
            with_alpha = [(key, path) for key, path in sorted(by_key.items()) if _has_alpha_channel(path)]
            if not with_alpha:
                raise DatasetError(
                    f"none of the {len(files)} image(s) under {', '.join(map(str, object_dirs))} has an alpha channel: "
                    "cut-outs need transparency (RGBA) so that their alpha is the mask"
                )
            self.object_files = [(key, path) for key, path in with_alpha if split_of(key, self.heldout_every) == split]
        self.emoji_font: Path | None = None
        self.emoji: list[int] = []
        if emoji is not None and str(emoji).lower() != "none":
            self.emoji_font = Path(emoji)
            if not self.emoji_font.is_file():
                raise FileNotFoundError(f"emoji font not found: {self.emoji_font} ({_INSTALL_HINT})")
            self.emoji = [cp for cp in _emoji_codepoints(self.emoji_font) if split_of(f"emoji:U+{cp:04X}", self.heldout_every) == split]
        if not self.object_files and not self.emoji:
            raise DatasetError(f"no cut-out falls in the {split} split: give more objects or another emoji font")
        self._procedural = ProceduralHQDataset(self.seed, self.length, min_side=max(64, self.min_side), max_side=max(64, self.max_side)) if self.procedural_share > 0 else None
        self.name = f"copypaste:seed{self.seed}:{split}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seed={self.seed}, length={self.length}, split={self.split!r}, "
            f"backgrounds={len(self.backgrounds)}, object_files={len(self.object_files)}, emoji={len(self.emoji)})"
        )

    def validate(self, max_errors: int = 20) -> None:
        """Sources were checked when the dataset was built; unusable cut-outs are skipped when drawn."""

    # -- sources ---------------------------------------------------------------------------------

    def cutout_keys(self) -> list[str]:
        """Split keys of every cut-out this split may draw (files and emoji)."""
        return [key for key, _ in self.object_files] + [f"emoji:U+{cp:04X}" for cp in self.emoji]

    def _draw_cutout(self, rng: np.random.Generator) -> Cutout:
        """A random usable cut-out (files and emoji drawn with equal chance when both exist)."""
        for _ in range(50):
            use_file = bool(self.object_files) and (not self.emoji or rng.random() < 0.5)
            if use_file:
                key, path = self.object_files[int(rng.integers(len(self.object_files)))]
                rgba = _CUTOUT_CACHE.get(("file", str(path)), lambda: _load_cutout_file(path))
            else:
                codepoint = self.emoji[int(rng.integers(len(self.emoji)))]
                key = f"emoji:U+{codepoint:04X}"
                rgba = _CUTOUT_CACHE.get(("emoji", str(self.emoji_font), codepoint), lambda: _render_emoji(self.emoji_font, codepoint))
            if rgba is not None:
                return Cutout(rgba, key)
        raise DatasetError(f"50 cut-outs drawn in a row had no usable alpha silhouette ({self!r})")

    def _background(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        from PIL import Image

        path = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        photo = _BACKGROUND_CACHE.get(("background", str(path)), lambda: _load_background(path))
        photo_h, photo_w = photo.shape[:2]
        # The largest window of the target aspect, scaled down by a random factor (zoom in).
        aspect = width / height
        max_h = min(photo_h, photo_w / aspect)
        zoom = math.exp(rng.uniform(math.log(0.35), 0.0)) if self.augment else 1.0
        crop_h = max(8.0, max_h * zoom)
        crop_w = crop_h * aspect
        top = rng.uniform(0, max(0.0, photo_h - crop_h))
        left = rng.uniform(0, max(0.0, photo_w - crop_w))
        image = Image.fromarray(photo).resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.float32)
        if self.augment:
            if rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            pixels = _colour_jitter(pixels, rng, strength=1.0)
        return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)

    def _transform(self, cutout: Cutout, rng: np.random.Generator, height: int, width: int) -> Placement:
        """Scale (small to large), stretch, rotate, flip, jitter, blur; place mostly inside the canvas."""
        from PIL import Image, ImageFilter

        image = Image.fromarray(cutout.rgba).convert("RGBa")  # premultiplied: no dark fringes when resampling
        longest = math.exp(rng.uniform(math.log(0.12), math.log(0.7))) * min(height, width)
        stretch = math.exp(rng.uniform(-0.3, 0.3)) if self.augment else 1.0
        scale = longest / max(image.size)
        size = (max(4, round(image.width * scale * stretch)), max(4, round(image.height * scale / stretch)))
        image = image.resize(size, Image.BICUBIC if scale > 1 else Image.BILINEAR)
        shadow = None
        if self.augment:
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if rng.random() < 0.6:
                image = image.rotate(float(rng.uniform(-45, 45)), resample=Image.BILINEAR, expand=True)
            if rng.random() < 0.25:
                image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
            if rng.random() < 0.4:
                offset = max(2, int(0.04 * longest))
                shadow = (int(rng.integers(-offset, offset + 1)), int(rng.integers(1, offset + 1)),
                          float(rng.uniform(2, 8)), float(rng.uniform(0.25, 0.6)))
        rgba = np.array(image.convert("RGBA"))
        if self.augment:
            rgba[..., :3] = np.clip(_colour_jitter(rgba[..., :3].astype(np.float32), rng, strength=0.6) + 0.5, 0, 255).astype(np.uint8)
        h, w = rgba.shape[:2]
        # Up to a fifth of the cut-out may hang over the border.
        top = int(rng.integers(-h // 5, max(-h // 5 + 1, height - h + h // 5 + 1)))
        left = int(rng.integers(-w // 5, max(-w // 5 + 1, width - w + w // 5 + 1)))
        return Placement(rgba, top, left, cutout.key, shadow)

    # -- items -----------------------------------------------------------------------------------

    def generate(self, index: int) -> tuple[SegmentationSample, list[Placement]]:
        """Item ``index`` and the record of its pastes (empty for a procedural item)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        index %= self.length
        split_salt = SPLITS.index(self.split)
        for attempt in range(10):
            rng = np.random.default_rng([self.seed, index, 0xC0FE, split_salt, attempt])
            if self._procedural is not None and rng.random() < self.procedural_share:
                return self._procedural[index], []
            height = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
            width = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
            background = self._background(rng, height, width)
            count = int(rng.integers(self.min_objects, self.max_objects + 1))
            placements = [self._transform(self._draw_cutout(rng), rng, height, width) for _ in range(count)]
            minimum_area = max(20, int(0.001 * height * width))
            image, masks = compose_cutouts(background, placements, min_visible=self.min_visible, min_area=minimum_area)
            if masks.shape[0]:
                name = f"copypaste-{self.split}-{self.seed}-{index:07d}"
                return SegmentationSample(image, masks, name), placements
        raise DatasetError(f"{self!r}: item {index} kept no visible object in 10 attempts")

    def __getitem__(self, index: int) -> SegmentationSample:
        return self.generate(index)[0]


def _colour_jitter(pixels: np.ndarray, rng: np.random.Generator, *, strength: float) -> np.ndarray:
    """Brightness, contrast, saturation and per-channel gain, scaled by ``strength``: float ``[..., 3]``."""
    brightness = 1.0 + strength * rng.uniform(-0.3, 0.3)
    contrast = 1.0 + strength * rng.uniform(-0.3, 0.3)
    saturation = 1.0 + strength * rng.uniform(-0.4, 0.4)
    gain = 1.0 + strength * rng.uniform(-0.08, 0.08, size=3).astype(np.float32)
    grey = pixels.mean(axis=-1, keepdims=True)
    pixels = grey + (pixels - grey) * saturation
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    return pixels * brightness * gain


# --------------------------------------------------------------------------------------------------
# spec


COPYPASTE_USAGE = (
    "copypaste dataset spec must be copypaste:SEED[:LENGTH][:key=value...] with keys backgrounds=DIR[,DIR], "
    "objects=DIR[,DIR], emoji=FONT|none, split=train|heldout, per_image=MIN-MAX, size=MIN-MAX, procedural=SHARE, "
    "min_visible=FRACTION, heldout_every=N, augment=0|1"
)


def _range(value: str, key: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError as error:
        raise ValueError(f"{key}=MIN-MAX needs integers, got {key}={value!r}") from error


def from_spec(rest: str) -> CopyPasteDataset:
    """A :class:`CopyPasteDataset` from the part of a spec after ``copypaste:``."""
    parts = rest.split(":") if rest else []
    positional = [p for p in parts if "=" not in p]
    options = [p for p in parts if "=" in p]
    if not 1 <= len(positional) <= 2 or parts[: len(positional)] != positional:
        raise ValueError(f"{COPYPASTE_USAGE}; got copypaste:{rest}")
    try:
        seed = int(positional[0])
        length = int(positional[1]) if len(positional) > 1 else 1_000_000
    except ValueError as error:
        raise ValueError(f"{COPYPASTE_USAGE}; got copypaste:{rest}") from error
    kwargs: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key in ("backgrounds", "objects"):
            kwargs[key] = [v for v in value.split(",") if v]
        elif key == "emoji":
            kwargs["emoji"] = value
        elif key == "split":
            kwargs["split"] = value
        elif key == "per_image":
            kwargs["min_objects"], kwargs["max_objects"] = _range(value, key)
        elif key == "size":
            kwargs["min_side"], kwargs["max_side"] = _range(value, key)
        elif key in ("procedural", "min_visible"):
            try:
                kwargs["procedural_share" if key == "procedural" else key] = float(value)
            except ValueError as error:
                raise ValueError(f"{key}= needs a number, got {value!r}") from error
        elif key == "heldout_every":
            try:
                kwargs[key] = int(value)
            except ValueError as error:
                raise ValueError(f"heldout_every= needs an integer, got {value!r}") from error
        elif key == "augment":
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"augment= needs 0 or 1, got {value!r}")
            kwargs["augment"] = value in ("1", "true")
        else:
            raise ValueError(f"unknown copypaste option {key!r}; {COPYPASTE_USAGE}")
    return CopyPasteDataset(seed, length, **kwargs)

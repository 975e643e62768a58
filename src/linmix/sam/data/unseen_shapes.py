"""An evaluation-only procedural test set, independent of the training generator.

:class:`UnseenShapesDataset` draws shape families that :class:`linmix.sam.data.ProceduralHQDataset`
(wires, frames, trees, text strokes, wobbly blobs) never makes: ``star`` (5-9 pointed), ``crescent``,
``ring`` (an annulus, some with a gap: a C), ``spiral`` (a thin Archimedean stroke), ``holed_polygon``
(a random convex polygon with a polygonal or round hole), ``dumbbell`` (two discs joined by a bar)
and ``metaball`` (merged soft blobs, glyph-like). Backgrounds are different too: checkerboards, hard
stripes, two-colour gradients, polka dots and 1/f ("photograph-like") noise, with colours drawn in HSV
(vivid, pastel or greyish palettes) instead of uniform RGB; objects are filled with shading, stripes,
dots or grain.

Masks are exact: an object covers the pixels whose centre lies inside its shape (signed distance
<= 0), anti-aliased into the image; later objects occlude earlier ones; an object left with fewer
than 0.1% of the image (or 20 px) is dropped. Item ``i`` is a pure function of ``(seed, i)``.

Nothing trains on it: it is for ``linmix sam eval --dataset unseen:SEED[:LENGTH]`` (once wired into
``load_dataset``; build it with :func:`from_spec`) as a check that a model learned shapes, not its
own generator.
"""

from __future__ import annotations

import colorsys
import math
import numpy as np

from linmix.sam.data.formats import SegmentationSample
from linmix.sam.data.procedural import GeneratedDataset

__all__ = ["UnseenShapesDataset", "from_spec", "polygon_signed_distance"]


# --------------------------------------------------------------------------------------------------
# signed distances ([H, W], negative inside)


def _segment_distance(xx: np.ndarray, yy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    length2 = float(d @ d)
    if length2 == 0.0:
        return np.hypot(xx - a[0], yy - a[1])
    t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(xx - a[0] - t * d[0], yy - a[1] - t * d[1])


def polygon_signed_distance(xx: np.ndarray, yy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance of every (xx, yy) to a simple polygon ``vertices`` ``[N, 2]`` (x, y); negative
    inside (even-odd rule), any winding order."""
    distance = np.full(xx.shape, np.inf, dtype=np.float64)
    inside = np.zeros(xx.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        a, b = vertices[i], vertices[(i + 1) % count]
        np.minimum(distance, _segment_distance(xx, yy, a, b), out=distance)
        crosses = (a[1] > yy) != (b[1] > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = a[0] + (yy - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
        inside ^= crosses & (xx < x_cross)
    return np.where(inside, -distance, distance)


def _stroke(xx: np.ndarray, yy: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance of a polyline ``points`` thickened to ``radius`` (computed near it only)."""
    field = np.full(xx.shape, np.inf, dtype=np.float64)
    height, width = xx.shape
    for a, b in zip(points[:-1], points[1:]):
        pad = radius + 2
        x0, x1 = int(max(0, math.floor(min(a[0], b[0]) - pad))), int(min(width, math.ceil(max(a[0], b[0]) + pad) + 1))
        y0, y1 = int(max(0, math.floor(min(a[1], b[1]) - pad))), int(min(height, math.ceil(max(a[1], b[1]) + pad) + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        window = (slice(y0, y1), slice(x0, x1))
        np.minimum(field[window], _segment_distance(xx[window], yy[window], a, b) - radius, out=field[window])
    return field


# --------------------------------------------------------------------------------------------------
# colours and textures


def _palette_colour(rng: np.random.Generator, palette: str) -> np.ndarray:
    """An RGB colour (0-255 float) from a vivid, pastel or greyish HSV palette."""
    hue = rng.uniform(0, 1)
    if palette == "vivid":
        saturation, value = rng.uniform(0.75, 1.0), rng.uniform(0.55, 1.0)
    elif palette == "pastel":
        saturation, value = rng.uniform(0.15, 0.4), rng.uniform(0.8, 1.0)
    else:  # greyish, from dark to light
        saturation, value = rng.uniform(0.0, 0.12), rng.uniform(0.08, 0.95)
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float64)


def _pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1/f noise ``[H, W]`` in [0, 1]: the spectrum of natural photographs."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fy, fx)
    frequency[0, 0] = 1.0
    spectrum = (rng.standard_normal(frequency.shape) + 1j * rng.standard_normal(frequency.shape)) / frequency ** rng.uniform(0.9, 1.4)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width))
    low, high = np.percentile(field, [1, 99])
    return np.clip((field - low) / max(high - low, 1e-9), 0.0, 1.0)


def _pattern(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, kind: str, scale: float) -> np.ndarray:
    """A two-level pattern ``[H, W]`` in [0, 1]."""
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "checker":
        return ((np.floor(u / scale) + np.floor(v / scale)) % 2).astype(np.float64)
    if kind == "stripes":
        return (np.floor(u / scale) % 2).astype(np.float64)
    if kind == "dots":
        cu, cv = (u / scale) % 1.0 - 0.5, (v / scale) % 1.0 - 0.5
        return (np.hypot(cu, cv) < rng.uniform(0.2, 0.4)).astype(np.float64)
    raise ValueError(kind)


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, palette: str) -> np.ndarray:
    height, width = xx.shape
    first, second = _palette_colour(rng, palette), _palette_colour(rng, palette)
    kind = ("checker", "stripes", "gradient", "dots", "pink")[int(rng.integers(5))]
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        weight = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    elif kind == "pink":
        weight = _pink_noise(rng, height, width)
    else:
        weight = _pattern(rng, xx, yy, kind, scale=float(rng.uniform(8, 48)))
    image = first[None, None] * (1 - weight[..., None]) + second[None, None] * weight[..., None]
    return image + rng.normal(0, rng.uniform(0, 6), size=(height, width, 1))


def _object_fill(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, colour: np.ndarray, palette: str) -> np.ndarray:
    kind = ("shaded", "stripes", "dots", "grain")[int(rng.integers(4))]
    if kind == "shaded":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(xx.shape)
        return colour[None, None] * (0.75 + 0.5 * t[..., None] - 0.25 * float(t.mean()))
    if kind == "grain":
        return colour[None, None] + rng.normal(0, 14, size=(*xx.shape, 3))
    other = _palette_colour(rng, palette)
    other = 0.5 * (other + colour)  # a second tone near the first, so the object reads as one thing
    weight = _pattern(rng, xx, yy, "stripes" if kind == "stripes" else "dots", scale=float(rng.uniform(4, 14)))
    return colour[None, None] * (1 - weight[..., None]) + other[None, None] * weight[..., None]


# --------------------------------------------------------------------------------------------------
# the dataset


class UnseenShapesDataset(GeneratedDataset):
    """Evaluation-only procedural images with exact masks (see the module docstring)."""

    KINDS = ("star", "crescent", "ring", "spiral", "holed_polygon", "dumbbell", "metaball")
    PALETTES = ("vivid", "pastel", "greyish")

    def __init__(self, seed: int = 0, length: int = 1000, *, min_side: int = 192, max_side: int = 448,
                 min_objects: int = 1, max_objects: int = 4):
        self._set_draws(seed, length, min_side, max_side, min_objects, max_objects)
        self.name = f"unseen:seed{self.seed}"

    def __getitem__(self, index: int) -> SegmentationSample:
        return self.generate(index)[0]

    def generate(self, index: int) -> tuple[SegmentationSample, list[str]]:
        """Item ``index`` and the kind of each of its (kept) objects."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, 0x0B5E])  # a stream of its own
        height = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
        width = int(rng.integers(self.min_side // 16, self.max_side // 16 + 1)) * 16
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        palette = self.PALETTES[int(rng.integers(len(self.PALETTES)))]
        image = _background(rng, xx, yy, palette)
        background_mean = image.reshape(-1, 3).mean(0)
        masks: list[np.ndarray] = []
        kinds: list[str] = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            kind = self.KINDS[int(rng.integers(len(self.KINDS)))]
            field = getattr(self, f"_{kind}")(rng, xx, yy)
            object_palette = self.PALETTES[int(rng.integers(len(self.PALETTES)))]
            colour = _palette_colour(rng, object_palette)
            for _attempt in range(20):  # stand out from the background on average
                if np.abs(colour - background_mean).sum() >= 140:
                    break
                colour = _palette_colour(rng, self.PALETTES[int(rng.integers(len(self.PALETTES)))])
            fill = _object_fill(rng, xx, yy, colour, object_palette)
            coverage = np.clip(0.5 - field, 0.0, 1.0)[..., None]
            image = image * (1 - coverage) + fill * coverage
            mask = field <= 0
            masks = [m & ~mask for m in masks]
            masks.append(mask)
            kinds.append(kind)
        minimum_area = max(20, int(0.001 * height * width))
        kept = [(m, k) for m, k in zip(masks, kinds) if int(m.sum()) >= minimum_area]
        if not kept:
            kept = [max(zip(masks, kinds), key=lambda pair: int(pair[0].sum()))]
        pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        sample = SegmentationSample(pixels, np.stack([m for m, _ in kept]), f"unseen-{self.seed}-{index:07d}")
        return sample, [k for _, k in kept]

    # -- shape families: each returns a signed distance [H, W], negative inside ------------------

    @staticmethod
    def _centre_and_size(rng, xx, yy, low=0.12, high=0.3):
        height, width = xx.shape
        size = rng.uniform(low, high) * min(height, width)
        cx = rng.uniform(0.2, 0.8) * width
        cy = rng.uniform(0.2, 0.8) * height
        return cx, cy, size

    def _star(self, rng, xx, yy):
        cx, cy, outer = self._centre_and_size(rng, xx, yy)
        points = int(rng.integers(5, 10))
        inner = outer * rng.uniform(0.35, 0.6)
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.arange(2 * points) * math.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
        vertices = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        return polygon_signed_distance(xx, yy, vertices)

    def _crescent(self, rng, xx, yy):
        cx, cy, radius = self._centre_and_size(rng, xx, yy)
        angle = rng.uniform(0, 2 * math.pi)
        shift = radius * rng.uniform(0.3, 0.7)
        bite = radius * rng.uniform(0.8, 1.05)
        disc = np.hypot(xx - cx, yy - cy) - radius
        cut = np.hypot(xx - cx - shift * math.cos(angle), yy - cy - shift * math.sin(angle)) - bite
        return np.maximum(disc, -cut)

    def _ring(self, rng, xx, yy):
        cx, cy, radius = self._centre_and_size(rng, xx, yy)
        half_thickness = radius * rng.uniform(0.08, 0.3)
        field = np.abs(np.hypot(xx - cx, yy - cy) - radius) - half_thickness
        if rng.random() < 0.5:  # a gap: the ring becomes a C
            angle = rng.uniform(0, 2 * math.pi)
            gap = np.hypot(xx - cx - radius * math.cos(angle), yy - cy - radius * math.sin(angle)) - radius * rng.uniform(0.3, 0.6)
            field = np.maximum(field, -gap)
        return field

    def _spiral(self, rng, xx, yy):
        cx, cy, radius = self._centre_and_size(rng, xx, yy, 0.15, 0.32)
        turns = rng.uniform(1.5, 3.5)
        theta = np.linspace(0, 2 * math.pi * turns, int(40 * turns))
        r = radius * (0.08 + 0.92 * theta / theta[-1])
        direction = 1 if rng.random() < 0.5 else -1
        start = rng.uniform(0, 2 * math.pi)
        points = np.stack([cx + r * np.cos(start + direction * theta), cy + r * np.sin(start + direction * theta)], axis=1)
        spacing = radius / turns
        return _stroke(xx, yy, points, float(np.clip(spacing * rng.uniform(0.08, 0.22), 1.2, 8.0)))

    def _holed_polygon(self, rng, xx, yy):
        cx, cy, radius = self._centre_and_size(rng, xx, yy, 0.14, 0.32)
        sides = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=sides)) if rng.random() < 0.5 else (
            rng.uniform(0, 2 * math.pi) + np.arange(sides) * 2 * math.pi / sides)
        vertices = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        outer = polygon_signed_distance(xx, yy, vertices)
        inner_scale = rng.uniform(0.25, 0.55)
        if rng.random() < 0.5:
            hole = polygon_signed_distance(xx, yy, np.stack([cx + inner_scale * (vertices[:, 0] - cx), cy + inner_scale * (vertices[:, 1] - cy)], axis=1))
        else:
            hole = np.hypot(xx - cx, yy - cy) - inner_scale * radius * math.cos(math.pi / max(sides, 3))
        return np.maximum(outer, -hole)

    def _dumbbell(self, rng, xx, yy):
        cx, cy, length = self._centre_and_size(rng, xx, yy, 0.2, 0.4)
        angle = rng.uniform(0, math.pi)
        offset = 0.5 * length * np.array([math.cos(angle), math.sin(angle)])
        a, b = np.array([cx, cy]) - offset, np.array([cx, cy]) + offset
        r1, r2 = length * rng.uniform(0.15, 0.3), length * rng.uniform(0.15, 0.3)
        bar = _segment_distance(xx, yy, a, b) - min(r1, r2) * rng.uniform(0.2, 0.45)
        return np.minimum(np.minimum(np.hypot(xx - a[0], yy - a[1]) - r1, np.hypot(xx - b[0], yy - b[1]) - r2), bar)

    def _metaball(self, rng, xx, yy):
        cx, cy, size = self._centre_and_size(rng, xx, yy, 0.15, 0.3)
        potential = np.zeros_like(xx)
        for _ in range(int(rng.integers(3, 7))):
            bx, by = cx + rng.uniform(-1, 1) * size, cy + rng.uniform(-1, 1) * size
            r = size * rng.uniform(0.25, 0.5)
            potential += r * r / ((xx - bx) ** 2 + (yy - by) ** 2 + 1e-6)
        # Level set potential = 1, turned into an approximate distance (value over gradient norm).
        value = 1.0 - potential
        gy, gx = np.gradient(value)
        return value / np.maximum(np.hypot(gx, gy), 1e-6)


def from_spec(rest: str) -> UnseenShapesDataset:
    """An :class:`UnseenShapesDataset` from the part of a spec after ``unseen:`` (``SEED[:LENGTH]``)."""
    usage = f"unseen dataset spec must be unseen:SEED[:LENGTH], got unseen:{rest}"
    parts = rest.split(":") if rest else []
    if not 1 <= len(parts) <= 2:
        raise ValueError(usage)
    try:
        seed = int(parts[0])
        length = int(parts[1]) if len(parts) > 1 else 1000
    except ValueError as error:
        raise ValueError(usage) from error
    return UnseenShapesDataset(seed, length)


"""The procedural high-quality dataset: seeded synthetic images with thin wires, frames with holes,
branching shapes and text-like strokes on textured backgrounds, at several resolutions, with exact
masks. Item ``i`` is a pure function of ``(seed, i)``; ``procedural:1`` is the held-out split."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from linmix.sam.data.formats import SegmentationSample

__all__ = ["ProceduralHQDataset"]


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


class GeneratedDataset:
    """What the generated datasets (procedural, copy-paste, the unseen-generator test set) share: item
    ``i`` is a seeded draw, a pure function of ``(seed, i)``, so batch sources read item p directly
    instead of shuffling (``is_generated``), and there are no files to validate. Subclasses set
    ``seed`` and ``length``."""

    is_generated = True
    seed: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, length={self.length})"

    def validate(self, max_errors: int = 20) -> None:
        """Nothing to check: generated data is always well-formed."""

    def _set_draws(self, seed: int, length: int, min_side: int, max_side: int, min_objects: int, max_objects: int,
                   *, smallest_side: int = 64) -> None:
        """Check and store what every generator draws from: item count, image sides, objects per image."""
        if length < 1 or min_side < smallest_side or max_side < min_side or not 1 <= min_objects <= max_objects:
            raise ValueError(
                f"need length >= 1, {smallest_side} <= min_side <= max_side and 1 <= min_objects <= max_objects; "
                f"got length={length}, min_side={min_side}, max_side={max_side}, min_objects={min_objects}, "
                f"max_objects={max_objects}"
            )
        self.seed, self.length = int(seed), int(length)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)


class ProceduralHQDataset(GeneratedDataset):
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
        self._set_draws(seed, length, min_side, max_side, min_objects, max_objects)
        self.name = f"procedural:seed{seed}"
        if (self.min_objects, self.max_objects) != (1, 3):
            self.name += f":objects={self.min_objects}-{self.max_objects}"

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

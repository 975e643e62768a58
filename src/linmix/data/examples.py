"""Bundled example images for the demos, with prompts and ground-truth masks.

The images are drawn procedurally (shapes, a ring and a thin wire on textured backgrounds: the kind
of scene the shipped RWKV-SAM model was trained on) and shipped as PNG package data under
``linmix/data/examples/``. :func:`render_example` redraws any of them exactly, with the masks of
its objects, so demos can score a prediction against the truth::

    for example in EXAMPLES:
        image = load_example_image(example.name)          # HxWx3 uint8 RGB
        truth = render_example(example.name)[1]           # {object name: HxW bool}
        for prompt in example.prompts: ...

Regenerate the files after changing a drawing with ``python -m linmix.data.examples``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EXAMPLES", "EXAMPLES_DIR", "Example", "Prompt", "example_path", "load_example_image", "render_example"]

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


@dataclass(frozen=True)
class Prompt:
    """One prompt on an example: points (x, y) with labels (1 foreground, 0 background) and/or a box
    XYXY, all in pixels, and the object it should select."""

    name: str
    target: str
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    prompts: tuple[Prompt, ...]


# -------------------------------------------------------------------------------------------------
# drawing


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return xs + 0.5, ys + 0.5


def _background(height: int, width: int, rng: np.random.Generator, top: tuple, bottom: tuple, texture: float) -> np.ndarray:
    xs, ys = _grid(height, width)
    t = (ys / height)[..., None]
    image = (1 - t) * np.asarray(top, dtype=np.float64) + t * np.asarray(bottom, dtype=np.float64)
    # Smooth blotches plus fine grain, so the background is not a flat colour.
    blotches = sum(
        np.sin(xs / rng.uniform(9, 30) + rng.uniform(0, 6.3)) * np.cos(ys / rng.uniform(9, 30) + rng.uniform(0, 6.3))
        for _ in range(3)
    )
    image += texture * blotches[..., None]
    image += rng.normal(0, texture / 8, size=image.shape)
    return image


def _paint(image: np.ndarray, mask: np.ndarray, color: tuple, rng: np.random.Generator, shading: float = 18.0) -> None:
    xs, ys = _grid(*mask.shape)
    shade = shading * np.sin(xs / 11.0) * np.cos(ys / 13.0)
    fill = np.asarray(color, dtype=np.float64) + shade[..., None] + rng.normal(0, 1.5, size=image.shape)
    image[mask] = fill[mask]


def _ellipse(height, width, cx, cy, rx, ry, angle=0.0) -> np.ndarray:
    xs, ys = _grid(height, width)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xs - cx) * c + (ys - cy) * s) / rx
    v = (-(xs - cx) * s + (ys - cy) * c) / ry
    return u * u + v * v <= 1.0


def _rectangle(height, width, cx, cy, half_w, half_h, angle=0.0) -> np.ndarray:
    xs, ys = _grid(height, width)
    c, s = np.cos(angle), np.sin(angle)
    u = (xs - cx) * c + (ys - cy) * s
    v = -(xs - cx) * s + (ys - cy) * c
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def _polygon(height, width, vertices) -> np.ndarray:
    """Convex polygon, vertices in either winding order."""
    xs, ys = _grid(height, width)
    vertices = list(vertices)
    left = np.ones((height, width), dtype=bool)
    right = np.ones((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        left &= cross <= 0
        right &= cross >= 0
    return left | right


def _wire(height, width, points, thickness) -> np.ndarray:
    """A thick polyline through ``points``."""
    xs, ys = _grid(height, width)
    mask = np.zeros((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        mask |= (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= (thickness / 2) ** 2
    return mask


def _shapes() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    height, width = 288, 384
    rng = np.random.default_rng(11)
    image = _background(height, width, rng, (70, 90, 120), (150, 160, 150), texture=14)
    masks = {
        "ellipse": _ellipse(height, width, 110, 120, 70, 45, 0.35),
        "square": _rectangle(height, width, 265, 95, 48, 48, -0.3),
        "triangle": _polygon(height, width, [(250, 270), (350, 270), (300, 175)]),
    }
    colors = {"ellipse": (205, 60, 50), "square": (40, 80, 200), "triangle": (235, 200, 40)}
    for name, mask in masks.items():
        _paint(image, mask, colors[name], rng)
    return image, masks


def _ring_and_wire() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    height, width = 320, 320
    rng = np.random.default_rng(22)
    image = _background(height, width, rng, (200, 190, 160), (120, 110, 90), texture=16)
    ring = _ellipse(height, width, 120, 130, 80, 80) & ~_ellipse(height, width, 120, 130, 48, 48)
    wire = _wire(height, width, [(40, 290), (120, 250), (200, 275), (260, 210), (300, 60)], thickness=7) & ~ring
    disc = _ellipse(height, width, 250, 95, 36, 36) & ~wire
    masks = {"ring": ring, "wire": wire, "disc": disc}
    colors = {"ring": (40, 150, 70), "wire": (30, 30, 35), "disc": (150, 40, 160)}
    for name, mask in masks.items():
        _paint(image, mask, colors[name], rng, shading=10)
    return image, masks


def _overlap() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    height, width = 256, 384
    rng = np.random.default_rng(33)
    image = _background(height, width, rng, (40, 60, 50), (90, 120, 100), texture=12)
    xs, ys = _grid(height, width)
    image += (12 * np.sign(np.sin(xs / 6.0)))[..., None]  # stripes: a busier background
    card = _rectangle(height, width, 150, 130, 95, 70, 0.12)
    disc = _ellipse(height, width, 245, 150, 62, 62)
    card &= ~disc  # the disc lies on top of the card
    star_vertices = [(330 + r * np.sin(a), 60 - r * np.cos(a))
                     for k, a in enumerate(np.linspace(0, 2 * np.pi, 10, endpoint=False)) for r in [(38, 16)[k % 2]]]
    star = np.zeros((height, width), dtype=bool)
    for k in range(10):  # a star as the union of triangles from its centre
        a, b = star_vertices[k], star_vertices[(k + 1) % 10]
        star |= _polygon(height, width, [(330.0, 60.0), b, a])
    star &= ~disc
    masks = {"card": card, "disc": disc, "star": star}
    colors = {"card": (225, 225, 215), "disc": (220, 110, 30), "star": (245, 215, 60)}
    for name, mask in masks.items():
        _paint(image, mask, colors[name], rng)
    return image, masks


_RENDERERS: dict[str, Callable[[], tuple[np.ndarray, dict[str, np.ndarray]]]] = {
    "shapes": _shapes,
    "ring_and_wire": _ring_and_wire,
    "overlap": _overlap,
}

EXAMPLES: tuple[Example, ...] = (
    Example(
        "shapes",
        "an ellipse, a square and a triangle on a textured gradient",
        (
            Prompt("box", "ellipse", box=(38, 68, 182, 172)),
            Prompt("point", "square", points=((265, 95),), labels=(1,)),
        ),
    ),
    Example(
        "ring_and_wire",
        "a ring (with a hole) and a thin wire: high-quality boundaries",
        (
            Prompt("box", "ring", box=(38, 48, 202, 212)),
            Prompt("points", "wire", points=((120, 250), (200, 275), (120, 130)), labels=(1, 1, 0)),
        ),
    ),
    Example(
        "overlap",
        "a disc lying on a card, a star, on a striped background",
        (
            Prompt("point+background", "card", points=((110, 120), (245, 150)), labels=(1, 0)),
            Prompt("box", "disc", box=(181, 86, 309, 214)),
        ),
    ),
)


def render_example(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw example ``name``: (HxWx3 uint8 RGB image, {object name: HxW bool mask})."""
    if name not in _RENDERERS:
        raise ValueError(f"unknown example {name!r}; expected one of {sorted(_RENDERERS)}")
    image, masks = _RENDERERS[name]()
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


def example_path(name: str) -> Path:
    """The bundled PNG of example ``name``."""
    if name not in _RENDERERS:
        raise ValueError(f"unknown example {name!r}; expected one of {sorted(_RENDERERS)}")
    return EXAMPLES_DIR / f"{name}.png"


def load_example_image(name: str) -> np.ndarray:
    """The bundled PNG of example ``name`` as HxWx3 uint8 RGB."""
    from linmix.segment import read_image

    return read_image(example_path(name))


def _write_all() -> None:
    from linmix.visualize import save_png

    for example in EXAMPLES:
        image, _ = render_example(example.name)
        path = save_png(image, example_path(example.name))
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    _write_all()

"""Random SPR-Shapes scenes: many small and large coloured shapes on a textured background, some occluded.

A :class:`Scene` is plain data (what is where, in draw order) from which :func:`~spr_lightning.shapes.render.
render_scene` draws the image and the writers derive every annotation. Why these choices:

* Sizes are two clearly separated bands of the image's short side (small 9-12.5%, large 19-26%, at least
  20 px), so "small" and "large" are never borderline, and every box is at least 20 x 20 = 400 px²: above the
  300 px² of the SPR object filter at any image size.
* Objects are placed one on top of the other at random; a placement is refused when it would leave an object
  below it less than ``min_visible`` visible. Occlusion then happens often (as in real photos) but every object
  stays recognisable, and its visible fraction is recorded. Boxes are *full* boxes (occluded parts included),
  as COCO annotates amodal extents of partly hidden objects only approximately; here they are exact.
* Every scene has more than eight objects (the SPR image filter), ``min_objects`` = 9 by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from spr_lightning.shapes.masks import mask_bounds, shape_mask

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "SIZES",
    "Background",
    "Scene",
    "SceneConfig",
    "ShapeObject",
    "make_scene",
    "owner_map",
    "scene_config",
]

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
SIZES = ("small", "large")
#: Named colours and their base RGB (each object gets a small random jitter around it).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (235, 210, 40),
    "green": (50, 160, 60),
    "blue": (45, 90, 210),
    "purple": (130, 60, 180),
    "pink": (235, 125, 185),
    "white": (240, 240, 240),
}
BACKGROUNDS = ("gradient", "stripes", "checker", "noise")


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene generator (defaults give 224 px images with 9-16 objects).

    Attributes:
        image_size: ``W`` (square images) or ``(W, H)``; at least 128 px on the short side.
        min_objects: fewest objects in a scene (must exceed 8 for SPR's image filter to keep every image).
        max_objects: most objects in a scene.
        large_prob: chance that an object is large.
        small_side: side of small objects as a fraction ``(lo, hi)`` of the image's short side.
        large_side: the same for large objects; must start at least 1.4x above ``small_side``'s top.
        min_side_px: no object side below this (20 px gives boxes >= 400 px²).
        min_visible: an object must keep at least this fraction of its pixels visible.
        max_tries: placements tried per object before it is dropped.
        color_jitter: per-channel random offset (+-) added to an object's base colour.
    """

    image_size: int | tuple[int, int] = 224
    min_objects: int = 9
    max_objects: int = 16
    large_prob: float = 0.35
    small_side: tuple[float, float] = (0.09, 0.125)
    large_side: tuple[float, float] = (0.19, 0.26)
    min_side_px: int = 20
    min_visible: float = 0.6
    max_tries: int = 60
    color_jitter: int = 12

    def __post_init__(self) -> None:
        w, h = self.size
        if min(w, h) < 128:
            raise ValueError(f"image_size must be at least 128 px on each side, got {self.image_size!r}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        small, large = self.side_range("small"), self.side_range("large")
        if large[0] < 1.4 * small[1]:
            raise ValueError(f"large sides {large} must start at least 1.4x above small sides {small}")

    @property
    def size(self) -> tuple[int, int]:
        """``(W, H)``."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        w, h = self.image_size
        return int(w), int(h)

    def side_range(self, size: str) -> tuple[int, int]:
        """Inclusive ``(lo, hi)`` side in pixels of ``small`` or ``large`` objects."""
        lo, hi = self.small_side if size == "small" else self.large_side
        short = min(self.size)
        low = max(self.min_side_px, round(lo * short))
        return low, max(low, round(hi * short))


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape, color, size: its attributes (names from :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`).
        origin: top-left ``(x, y)`` of the square it is drawn in.
        side: side of that square in pixels.
        box: tight ``(x1, y1, x2, y2)`` pixel-edge box of the full shape (occluded parts included).
        rgb: the fill colour drawn.
        visible_fraction: share of its pixels not covered by objects drawn later (4 decimals).
    """

    shape: str
    color: str
    size: str
    origin: tuple[int, int]
    side: int
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]
    visible_fraction: float = 1.0

    @property
    def label(self) -> str:
        """``"small red triangle"``: the category name of the object."""
        return f"{self.size} {self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def box_area(self) -> int:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


@dataclass(frozen=True)
class Background:
    """Background texture: ``kind`` from :data:`BACKGROUNDS`, its two muted colours, and the seed of its noise
    and clutter (so rendering is a pure function of the scene)."""

    kind: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    seed: int


@dataclass(frozen=True)
class Scene:
    """What an image shows: size, background, and objects in draw order (later ones on top)."""

    width: int
    height: int
    background: Background
    objects: tuple[ShapeObject, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _background(rng: np.random.Generator) -> Background:
    """Muted (greyish, mid-brightness) colours, so every named object colour stands out against them."""
    grey = rng.uniform(70, 180)
    c0 = np.clip(grey + rng.normal(0, 12, 3), 0, 255)
    c1 = np.clip(c0 + rng.choice([-1.0, 1.0]) * rng.uniform(20, 50) + rng.normal(0, 6, 3), 0, 255)
    colors = (tuple(int(v) for v in c0), tuple(int(v) for v in c1))
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Background(kind, colors, int(rng.integers(2**31)))  # type: ignore[arg-type]


def _colour(rng: np.random.Generator, name: str, jitter: int) -> tuple[int, int, int]:
    base = np.asarray(COLORS[name]) + rng.integers(-jitter, jitter + 1, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))  # type: ignore[return-value]


class _Canvas:
    """Which object is on top at each pixel, and how many pixels each object still shows."""

    def __init__(self, width: int, height: int) -> None:
        self.owner = np.full((height, width), -1, dtype=np.int16)
        self.full: list[int] = []
        self.visible = np.zeros(0, dtype=np.int64)

    def try_place(self, shape: str, side: int, x: int, y: int, min_visible: float) -> bool:
        """Put the mask at ``(x, y)`` on top unless an object below would drop under ``min_visible``."""
        mask = shape_mask(shape, side)
        window = self.owner[y : y + side, x : x + side]
        covered = window[mask]
        lost = np.bincount(covered[covered >= 0], minlength=len(self.full))
        left = self.visible - lost
        if np.any(left < min_visible * np.asarray(self.full)):
            return False
        window[mask] = len(self.full)
        self.full.append(int(mask.sum()))
        self.visible = np.append(left, self.full[-1])
        return True


def _try_scene(rng: np.random.Generator, config: SceneConfig) -> Scene | None:
    width, height = config.size
    background = _background(rng)
    canvas = _Canvas(width, height)
    placed: list[ShapeObject] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        size = "large" if rng.uniform() < config.large_prob else "small"
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        lo, hi = config.side_range(size)
        for _ in range(config.max_tries):
            side = int(rng.integers(lo, hi + 1))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            if canvas.try_place(shape, side, x, y, config.min_visible):
                bx1, by1, bx2, by2 = mask_bounds(shape, side)
                box = (x + bx1, y + by1, x + bx2, y + by2)
                placed.append(ShapeObject(shape, color, size, (x, y), side, box,
                                          _colour(rng, color, config.color_jitter)))
                break
    if len(placed) < config.min_objects:
        return None
    fractions = canvas.visible / np.asarray(canvas.full)
    objects = tuple(
        ShapeObject(o.shape, o.color, o.size, o.origin, o.side, o.box, o.rgb, round(float(f), 4))
        for o, f in zip(placed, fractions)
    )
    return Scene(width, height, background, objects)


def scene_config(image_size: int | tuple[int, int], overrides: Mapping[str, Any] | None = None) -> SceneConfig:
    """A :class:`SceneConfig` for ``image_size`` with some fields changed, e.g. ``{"small_side": [0.14, 0.18]}``
    from a command line or a JSON file (lists become the tuples the fields hold).

    Raises:
        ValueError: for a key that is not a field (``image_size`` is given separately) or a value the config refuses.
    """
    names = {f.name for f in fields(SceneConfig)} - {"image_size"}
    values = dict(overrides or {})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown scene setting(s) {unknown}; settings: {', '.join(sorted(names))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SceneConfig(image_size=image_size, **values)


def make_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> Scene:
    """A random scene; the same generator state gives the same scene.

    Raises:
        RuntimeError: when ``config`` leaves no room for ``min_objects`` objects (20 scenes tried).
    """
    config = config or SceneConfig()
    for _ in range(20):
        scene = _try_scene(rng, config)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place {config.min_objects} objects in a {config.size} image; "
                       "lower min_objects/large_prob or raise image_size")


def owner_map(scene: Scene) -> np.ndarray:
    """``[H, W]`` int16: index of the object on top at each pixel, ``-1`` for background."""
    owner = np.full((scene.height, scene.width), -1, dtype=np.int16)
    for k, obj in enumerate(scene.objects):
        x, y = obj.origin
        window = owner[y : y + obj.side, x : x + obj.side]
        window[shape_mask(obj.shape, obj.side)] = k
    return owner

"""Binary masks of the SPR-Shapes shapes, the single source of truth for pixels, boxes and visibility.

Every object is pasted through its mask (:mod:`~spr_lightning.shapes.render`) and the same mask gives its box
and visible fraction (:mod:`~spr_lightning.shapes.scene`), so annotations and pixels cannot disagree. Masks
depend only on ``(shape, side)`` and are cached.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPE_POLYGONS", "mask_bounds", "mask_image", "outline_mask", "shape_mask"]


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    """A ``points``-pointed star with its tip up, scaled so it touches all four sides of the unit square."""
    corners = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        corners.append((r * math.cos(angle), r * math.sin(angle)))
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in corners)


#: Unit-square outlines of the polygonal shapes (the circle is drawn as an ellipse). Each touches all four
#: sides of the square, so an object's box is the square it is drawn in.
SHAPE_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "hexagon": ((0.25, 0.0), (0.75, 0.0), (1.0, 0.5), (0.75, 1.0), (0.25, 1.0), (0.0, 0.5)),
    "star": _star(),
}


@lru_cache(maxsize=4096)
def mask_image(shape: str, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    last = side - 1  # PIL coordinates are inclusive: pixels 0 .. side-1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape in SHAPE_POLYGONS:
        draw.polygon([(x * last, y * last) for x, y in SHAPE_POLYGONS[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: circle, {', '.join(SHAPE_POLYGONS)}")
    return mask


@lru_cache(maxsize=4096)
def _mask_array(shape: str, side: int) -> np.ndarray:
    array = np.asarray(mask_image(shape, side)) > 0
    array.flags.writeable = False  # shared by the cache
    return array


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Read-only ``[side, side]`` bool mask of ``shape`` drawn in a ``side`` px square (cached)."""
    return _mask_array(shape, side)


@lru_cache(maxsize=4096)
def outline_mask(shape: str, side: int) -> Image.Image:
    """The shape's one-pixel rim (mask minus its erosion) as an ``L`` image: objects get a dark outline so that
    two touching objects of one colour still read as two."""
    mask = mask_image(shape, side)
    # Erode inside a zero border: PIL's filters repeat edge pixels, which would leave a square without a rim.
    padded = Image.new("L", (side + 2, side + 2), 0)
    padded.paste(mask, (1, 1))
    inner = np.asarray(padded.filter(ImageFilter.MinFilter(3)))[1:-1, 1:-1]
    return Image.fromarray(np.where((np.asarray(mask) > 0) & (inner == 0), 255, 0).astype(np.uint8))


@lru_cache(maxsize=4096)
def mask_bounds(shape: str, side: int) -> tuple[int, int, int, int]:
    """Tight ``(x1, y1, x2, y2)`` of the mask's pixels in its square, pixel edges (``x2`` exclusive): the object's
    box is exactly the pixels drawn, whatever the rasteriser did at the polygon's corners."""
    mask = shape_mask(shape, side)
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

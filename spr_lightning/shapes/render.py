"""Draw SPR-Shapes scenes with PIL: textured backgrounds, clutter, then the objects bottom to top.

Objects are pasted through the cached masks of :mod:`~spr_lightning.shapes.masks` (the same masks that gave
their boxes and visible fractions), so drawing an image is a background in numpy plus a few ``Image.paste``
calls: about a millisecond per 224 px image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from spr_lightning.shapes.masks import mask_image, outline_mask
from spr_lightning.shapes.scene import BACKGROUNDS, Scene, ShapeObject

__all__ = ["draw_background", "render_scene"]


def draw_background(scene: Scene) -> Image.Image:
    """The scene's textured background with its clutter (faint lines and dots that are not objects).

    Everything random here comes from ``scene.background.seed``, so a scene always renders the same image.
    """
    bg = scene.background
    rng = np.random.default_rng(bg.seed)
    w, h = scene.width, scene.height
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if bg.kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    elif bg.kind == "stripes":
        period = rng.uniform(8, 28)
        t = (np.sin(2 * math.pi * along / period) > 0).astype(np.float32) * 0.8 + 0.1
    elif bg.kind == "checker":
        cell = int(rng.integers(12, 40))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    elif bg.kind == "noise":
        cells = rng.uniform(0, 1, (int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        t = np.asarray(Image.fromarray(cells, mode="F").resize((w, h), Image.BILINEAR))
    else:
        raise ValueError(f"unknown background {bg.kind!r}; known: {', '.join(BACKGROUNDS)}")
    # Blending and grain in PIL (C loops): numpy float images cost more than everything else drawn.
    weight = Image.fromarray(np.ascontiguousarray(np.broadcast_to(t * 255, (h, w)), dtype=np.uint8), mode="L")
    image = Image.composite(Image.new("RGB", (w, h), bg.colors[1]), Image.new("RGB", (w, h), bg.colors[0]), weight)
    amp = int(rng.integers(5, 15))  # luminance grain: a film-like texture over the whole picture
    grain = Image.fromarray(rng.integers(0, 2 * amp + 1, (h, w), dtype=np.uint8), mode="L")
    image = ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), 1.0, -amp)
    _draw_clutter(image, rng, bg.colors[0])
    return image


def _draw_clutter(image: Image.Image, rng: np.random.Generator, base: tuple[int, int, int]) -> None:
    """Thin lines and tiny dots, low contrast and far smaller than any object, so a detector has distractors
    to ignore but nothing that could be taken for a shape."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    n = int(rng.integers(10, 30))
    # One batch of random numbers per image rather than per mark (drawing dominates otherwise).
    shades = rng.choice([-1, 1], n) * rng.integers(25, 50, n)
    colours = np.clip(np.asarray(base)[None, :] + shades[:, None], 0, 255).tolist()
    xs, ys = (rng.uniform(0, w, n)).tolist(), (rng.uniform(0, h, n)).tolist()
    is_line = (rng.uniform(size=n) < 0.6).tolist()
    lengths, angles = rng.uniform(6, 30, n).tolist(), rng.uniform(0, 2 * math.pi, n).tolist()
    widths, radii = rng.integers(1, 3, n).tolist(), rng.uniform(0.8, 2.5, n).tolist()
    for i in range(n):
        x, y, colour = xs[i], ys[i], tuple(colours[i])
        if is_line[i]:
            end = (x + lengths[i] * math.cos(angles[i]), y + lengths[i] * math.sin(angles[i]))
            draw.line([(x, y), end], fill=colour, width=widths[i])
        else:
            draw.ellipse((x - radii[i], y - radii[i], x + radii[i], y + radii[i]), fill=colour)


def _paste(image: Image.Image, obj: ShapeObject) -> None:
    dark = tuple(int(c * 0.5) for c in obj.rgb)
    image.paste(obj.rgb, obj.origin, mask_image(obj.shape, obj.side))
    image.paste(dark, obj.origin, outline_mask(obj.shape, obj.side))


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``: background, clutter, then the objects bottom to top (later ones occlude)."""
    image = draw_background(scene)
    for obj in scene.objects:
        _paste(image, obj)
    return image

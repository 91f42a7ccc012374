"""``ShapesGrounder``: a colour-and-shape detector for SPR-Shapes images. **Synthetic data only.**

SPR's localization score needs an open-vocabulary grounder (GroundingDINO) that proposes boxes for the phrases
of a description. Fine-tuning GroundingDINO on a CPU is out of the quickstart's reach, so for the SPR-Shapes world
this backend implements the same :class:`~spr_lightning.scoring.grounders.Grounder` protocol with plain image
analysis that works *only* because the world is drawn from eight flat colours and six shapes:

1. the caption is split into phrases, and each phrase's colour, shape and size words are read
   (``"two small red triangles"`` -> red, triangle, small; a word it does not know is ignored);
2. pixels within ``color_tolerance`` (RGB distance) of a named colour form that colour's mask; its connected
   components (objects have a dark rim, so touching objects of one colour stay apart) are candidate objects,
   their boxes grown by the one-pixel rim;
3. a component's shape is the template (:mod:`spr_lightning.shapes.masks`) its mask overlaps best, its size
   ``small`` or ``large`` by its longer side against the world's two size bands; a component matches a phrase
   when every attribute the phrase names agrees. Its score is the shape template IoU when the phrase names a
   shape, else 1.

Like a real detector it is imperfect: occluded objects give partial boxes and lower template IoUs, and
``box_threshold`` filters on that score. Never use it on real images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from spr_lightning.scoring.grounders import DEFAULT_BOX_THRESHOLD, DEFAULT_TEXT_THRESHOLD, GroundingResult
from spr_lightning.shapes.masks import shape_mask
from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES, scene_config

__all__ = ["PhraseQuery", "ShapesGrounder", "parse_phrases"]

_TEMPLATE_SIDE = 16
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


@dataclass(frozen=True)
class PhraseQuery:
    """The attributes one phrase names (``None``: not named) and the phrase text."""

    text: str
    color: str | None
    shape: str | None
    size: str | None


def parse_phrases(caption: str | Sequence[str]) -> list[PhraseQuery]:
    """Phrases of a caption with the colour, shape and size words each names; phrases naming none are dropped.

    A string is split at sentence ends, commas and ``and`` (how SPR-Shapes captions list objects); a list is
    taken as the phrases.
    """
    parts = [caption] if not isinstance(caption, str) else re.split(r"[.,;]|\band\b", caption.lower())
    if not isinstance(caption, str):
        parts = [p.lower() for p in caption]
    out = []
    for part in parts:
        words = re.findall(r"[a-z]+", part)
        color = next((w for w in words if w in COLORS), None)
        shape = next((_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS), None)
        size = next((w for w in words if w in SIZES), None)
        if color or shape or size:
            out.append(PhraseQuery(" ".join(words), color, shape, size))
    return out


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Each shape's mask at ``_TEMPLATE_SIDE`` px (its box is the whole square), as bool arrays."""
    side = 8 * _TEMPLATE_SIDE
    out = {}
    for shape in SHAPES:
        big = Image.fromarray(shape_mask(shape, side).astype(np.uint8) * 255)
        out[shape] = np.asarray(big.resize((_TEMPLATE_SIDE, _TEMPLATE_SIDE), Image.BILINEAR)) > 127
    return out


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """``(shape, IoU)`` of the template that best overlaps ``mask`` (a component cropped to its box)."""
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((_TEMPLATE_SIDE, _TEMPLATE_SIDE),
                                                                             Image.BILINEAR)) > 127
    best, best_iou = SHAPES[0], -1.0
    for shape, template in _templates().items():
        union = np.logical_or(small, template).sum()
        iou = float(np.logical_and(small, template).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


@dataclass(frozen=True)
class _Component:
    box: tuple[float, float, float, float]
    color: str
    shape: str
    shape_iou: float
    size: str


class ShapesGrounder(torch.nn.Module):
    """Grounds SPR-Shapes phrases by colour segmentation and shape templates (synthetic data only; see module doc).

    An ``nn.Module`` without parameters so that it sits in a LightningModule like the real grounders do.

    Args:
        image_size: side of the world's images (``write_world``'s ``image_size``): the size bands of ``small`` and
            ``large`` objects are fractions of it. Crops keep the image's pixel scale, so sizes stay comparable.
        color_tolerance: largest RGB distance of a pixel from a named colour that still counts as that colour
            (object colours are jittered by +-12 per channel and JPEG adds a little).
        min_pixels: components smaller than this are clutter or slivers of hidden objects and are ignored.
        scene: the world's scene settings when they are not the defaults (``world/scene.json`` of a quickstart run
            made with ``--scene``): the size bands come from them.
    """

    def __init__(self, image_size: int = 224, color_tolerance: float = 48.0, min_pixels: int = 20,
                 scene: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = scene_config(image_size, scene)
        small_hi = config.side_range("small")[1]
        large_lo = config.side_range("large")[0]
        self.size_split = (small_hi + large_lo) / 2
        self.color_tolerance = color_tolerance
        self.min_pixels = min_pixels
        self._palette = np.asarray(list(COLORS.values()), dtype=np.float32)

    def components(self, image: Image.Image) -> list[_Component]:
        """Every coloured object-like component of ``image`` with its box, colour, shape and size."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        distance = np.linalg.norm(pixels[:, :, None, :] - self._palette[None, None], axis=-1)
        nearest = distance.argmin(axis=-1)
        close = distance.min(axis=-1) <= self.color_tolerance
        found = []
        for index, color in enumerate(COLORS):
            labels, count = ndimage.label(close & (nearest == index))
            for k, window in enumerate(ndimage.find_objects(labels), start=1):
                if window is None:
                    continue
                mask = labels[window] == k
                if mask.sum() < self.min_pixels:
                    continue
                ys, xs = window
                shape, shape_iou = classify_shape(mask)
                # grow by the dark one-pixel rim that the colour mask leaves out
                box = (max(xs.start - 1, 0), max(ys.start - 1, 0), min(xs.stop + 1, image.width),
                       min(ys.stop + 1, image.height))
                side = max(box[2] - box[0], box[3] - box[1])
                size = "large" if side > self.size_split else "small"
                found.append(_Component(tuple(float(v) for v in box), color, shape, shape_iou, size))
        return found

    def ground(
        self,
        image: Image.Image,
        caption: str | Sequence[str],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> GroundingResult:
        """Boxes (``xyxy`` pixels of ``image``) of the components matching each phrase; ``text_threshold`` is
        unused (phrases are read from words, not token scores)."""
        del text_threshold
        boxes, scores, phrases = [], [], []
        components = self.components(image) if caption else []
        for query in parse_phrases(caption):
            for c in components:
                if (query.color not in (None, c.color) or query.size not in (None, c.size)
                        or query.shape not in (None, c.shape)):
                    continue
                score = c.shape_iou if query.shape is not None else 1.0
                if score >= box_threshold:
                    boxes.append(c.box)
                    scores.append(score)
                    phrases.append(query.text)
        return GroundingResult(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                               scores=torch.tensor(scores, dtype=torch.float32), phrases=phrases)

    def ground_batch(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> list[GroundingResult]:
        """:meth:`ground` per ``(image, caption)`` (the rewarding stage calls this on a batch of crops)."""
        return [self.ground(i, c, box_threshold, text_threshold) for i, c in zip(images, captions)]

"""LocVLM's three coordinate representations (Ranasinghe et al., CVPR 2024, §3.2).

* ``locvlm_nfp`` (normalised floating point): fractions of the image size with 4 decimals,
  ``[0.1234, 0.5678, 0.9012, 0.3456]``.
* ``locvlm_ivb`` (integer valued binning): each coordinate falls in one of ``num_bins`` uniform bins across its
  image dimension (224 for LocVLM-B, 336 for LocVLM-L): ``floor(v / size * num_bins)``, read back as
  ``q / num_bins * size``; ``[12, 40, 200, 223]``.
* ``locvlm_diga`` (deviation from image-grid anchors): the image is a ``grid x grid`` grid of anchors
  (index ``row * grid + col``); each corner is written as the index of the anchor cell it falls in, then its
  deviation from that cell's centre in cell units (in ``[-0.5, 0.5]``), ``deviation_decimals`` places:
  ``[a1, dx1, dy1, a2, dx2, dy2]``, e.g. ``[9, +0.25, -0.10, 54, -0.40, +0.02]``.

The paper gives the idea of DIGA but defers its exact text to an appendix that is not part of the paper text
we build from; the grid size and the six-number layout above are this project's concrete choice, kept
configurable. The paper writes boxes as ``[x1,y1,x2,y2]`` in prompts and ``(x1,y1,x2,y2)`` in answers: every
LocVLM codec decodes both brackets and writes ``brackets`` (``"[]"`` by default).
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

from spr_lightning.boxes import Box
from spr_lightning.coords.base import Codec, Match, box_group_pattern, chunk, numbers
from spr_lightning.coords.bins import IntBinCodec
from spr_lightning.coords.floats import NormFloatCodec

__all__ = ["LocVLMDIGACodec", "LocVLMIVBCodec", "LocVLMNFPCodec"]

_ANY_BRACKET_TAIL = re.compile(r"[\[(][\d\s.,+-]*\Z")


def _check_brackets(brackets: str) -> str:
    if len(brackets) != 2:
        raise ValueError(f"brackets is two characters like '[]' or '()', got {brackets!r}")
    return brackets


class LocVLMNFPCodec(NormFloatCodec):
    """LocVLM NFP: 4-decimal fractions of the image size (no square padding unless asked)."""

    name: ClassVar[str] = "locvlm_nfp"

    def __init__(
        self, decimals: int = 4, square_pad: bool = False, brackets: str = "[]", max_phrase_words: int = 5
    ) -> None:
        super().__init__(decimals, square_pad, sep=", ", brackets=brackets, max_phrase_words=max_phrase_words)


class LocVLMIVBCodec(IntBinCodec):
    """LocVLM IVB: integer bins ``0 .. num_bins - 1`` per image dimension.

    Args:
        num_bins: bins per dimension (224 for LocVLM-B, 336 for LocVLM-L).
        brackets: bracket characters written.
        max_phrase_words: see :class:`~spr_lightning.coords.base.Codec`.
    """

    name: ClassVar[str] = "locvlm_ivb"
    _pattern = box_group_pattern(r"[\[(]", r"[\])]")
    _tail = _ANY_BRACKET_TAIL

    def __init__(self, num_bins: int = 224, brackets: str = "[]", max_phrase_words: int = 5) -> None:
        super().__init__(scale=num_bins, max_value=num_bins - 1, max_phrase_words=max_phrase_words)
        self.num_bins = num_bins
        self.brackets = _check_brackets(brackets)

    def _scan(self, text: str) -> list[Match]:
        return [Match(m.span(), chunk(numbers(m.group(0)), 4)) for m in self._pattern.finditer(text)]

    def _render(self, values: list[tuple[float, ...]]) -> str:
        open_, close = self.brackets
        return ", ".join(open_ + ", ".join(str(int(v)) for v in box) + close for box in values)


class LocVLMDIGACodec(Codec):
    """LocVLM DIGA: per corner, a grid-anchor index and the deviation from that anchor's centre.

    Args:
        grid: anchors per side (``grid ** 2`` anchors).
        deviation_decimals: decimals of the deviations; the resolution is ``cell / 10 ** deviation_decimals``.
        brackets: bracket characters written.
        max_phrase_words: see :class:`~spr_lightning.coords.base.Codec`.
    """

    name: ClassVar[str] = "locvlm_diga"
    _pattern = box_group_pattern(r"[\[(]", r"[\])]", n=6)
    _tail = _ANY_BRACKET_TAIL

    def __init__(
        self, grid: int = 8, deviation_decimals: int = 2, brackets: str = "[]", max_phrase_words: int = 5
    ) -> None:
        super().__init__(max_phrase_words)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.deviation_decimals = deviation_decimals
        self.brackets = _check_brackets(brackets)

    def _scan(self, text: str) -> list[Match]:
        return [Match(m.span(), chunk(numbers(m.group(0)), 6)) for m in self._pattern.finditer(text)]

    def _point_to_pixels(self, anchor: float, dx: float, dy: float, image_size: tuple[int, int]) -> tuple[float, float]:
        g = self.grid
        index = min(max(int(anchor), 0), g * g - 1)  # an out-of-range anchor is clamped like any coordinate
        row, col = divmod(index, g)
        w, h = image_size
        return (col + 0.5 + dx) * w / g, (row + 0.5 + dy) * h / g

    def _pixels_to_point(self, x: float, y: float, image_size: tuple[int, int]) -> tuple[float, float, float]:
        g = self.grid
        w, h = image_size
        fx, fy = x / w * g, y / h * g
        col = min(max(math.floor(fx + 1e-9), 0), g - 1)
        row = min(max(math.floor(fy + 1e-9), 0), g - 1)
        d = self.deviation_decimals
        # + 0.0 turns a rounded -0.0 into 0.0 so it is written "+0.00"
        return row * g + col, round(fx - col - 0.5, d) + 0.0, round(fy - row - 0.5, d) + 0.0

    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        x1, y1 = self._point_to_pixels(*values[:3], image_size)
        x2, y2 = self._point_to_pixels(*values[3:6], image_size)
        return (x1, y1, x2, y2)

    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        x1, y1, x2, y2 = box
        return self._pixels_to_point(x1, y1, image_size) + self._pixels_to_point(x2, y2, image_size)

    def _render(self, values: list[tuple[float, ...]]) -> str:
        open_, close = self.brackets
        d = self.deviation_decimals
        parts = []
        for a1, dx1, dy1, a2, dx2, dy2 in values:
            nums = f"{int(a1)}, {dx1:+.{d}f}, {dy1:+.{d}f}, {int(a2)}, {dx2:+.{d}f}, {dy2:+.{d}f}"
            parts.append(f"{open_}{nums}{close}")
        return ", ".join(parts)

"""Normalised-float formats: Shikra ``[0.123,0.456,0.789,0.999]`` and LLaVA-1.5 ``[0.12, 0.34, 0.56, 0.78]``.

Both models pad the image to a square before the vision encoder (``expand2square``, image centred) and write
coordinates as fractions of that square, so ``square_pad=True`` is their default; with ``False`` the fractions
are of the image width and height. Values are rounded (not floored) to ``decimals`` places, as Shikra's
``norm_box_xyxy`` and LLaVA-1.5's REC data do.
"""

from __future__ import annotations

import re
from typing import ClassVar

from spr_lightning.boxes import Box, denormalize_box, from_square_padded, normalize_box, to_square_padded
from spr_lightning.coords.base import Codec, Match, box_group_pattern, chunk, numbers

__all__ = ["LlavaCodec", "NormFloatCodec", "ShikraCodec"]


class NormFloatCodec(Codec):
    """Fractions of the image (or of its padded square) written with a fixed number of decimals.

    Args:
        decimals: digits after the point.
        square_pad: coordinates are fractions of the ``max(W, H)`` square the image is centred in.
        sep: separator written between the four numbers (decoding accepts any spacing).
        group_sep: separator between boxes sharing one bracket (``None``: one box per bracket, several boxes
            written ``[a], [b]``).
        brackets: the two bracket characters written; decoding accepts ``[]`` and ``()``.
        max_phrase_words: see :class:`~spr_lightning.coords.base.Codec`.
    """

    name: ClassVar[str] = "norm_float"

    def __init__(
        self,
        decimals: int = 3,
        square_pad: bool = False,
        sep: str = ", ",
        group_sep: str | None = None,
        brackets: str = "[]",
        max_phrase_words: int = 5,
    ) -> None:
        super().__init__(max_phrase_words)
        if len(brackets) != 2:
            raise ValueError(f"brackets is two characters like '[]' or '()', got {brackets!r}")
        self.decimals = decimals
        self.square_pad = square_pad
        self.sep = sep
        self.group_sep = group_sep
        self.brackets = brackets
        grouping = None if group_sep is None else re.escape(group_sep.strip())
        self._pattern = box_group_pattern(r"[\[(]", r"[\])]", group_sep=grouping)
        self._tail = re.compile(r"[\[(][\d\s.,;+-]*\Z")

    def _scan(self, text: str) -> list[Match]:
        return [Match(m.span(), chunk(numbers(m.group(0)), 4)) for m in self._pattern.finditer(text)]

    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        box = tuple(values[:4])
        return from_square_padded(box, image_size) if self.square_pad else denormalize_box(box, image_size)

    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        norm = to_square_padded(box, image_size) if self.square_pad else normalize_box(box, image_size)
        return tuple(min(max(round(v, self.decimals), 0.0), 1.0) for v in norm)

    def _render(self, values: list[tuple[float, ...]]) -> str:
        open_, close = self.brackets
        boxes = [self.sep.join(f"{v:.{self.decimals}f}" for v in box) for box in values]
        if self.group_sep is None:
            return ", ".join(f"{open_}{b}{close}" for b in boxes)
        return open_ + self.group_sep.join(boxes) + close


class ShikraCodec(NormFloatCodec):
    """Shikra: ``[0.123,0.456,0.789,0.999]``, 3 decimals, no spaces, boxes of one phrase as ``[a;b]``."""

    name: ClassVar[str] = "shikra"

    def __init__(self, square_pad: bool = True, decimals: int = 3, max_phrase_words: int = 5) -> None:
        super().__init__(decimals, square_pad, sep=",", group_sep=";", max_phrase_words=max_phrase_words)


class LlavaCodec(NormFloatCodec):
    """LLaVA-1.5: ``[0.12, 0.34, 0.56, 0.78]``, 2 decimals, one box per bracket."""

    name: ClassVar[str] = "llava"

    def __init__(self, square_pad: bool = True, decimals: int = 2, max_phrase_words: int = 5) -> None:
        super().__init__(decimals, square_pad, sep=", ", group_sep=None, max_phrase_words=max_phrase_words)

"""Integer-bin formats: Ferret ``[x1, y1, x2, y2]`` (0-999), CogVLM ``[[x1,y1,x2,y2]]`` (000-999) and
MiniGPT-v2 ``{<x1><y1><x2><y2>}`` (0-100).

All three write ``floor(v / size * scale)`` per coordinate, x against the width and y against the height,
and read ``q / scale * size`` back (each model's own evaluation code). Ferret and CogVLM clamp to 999 so a box
touching the right/bottom edge stays in range; MiniGPT-v2 keeps 0-100 inclusive.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

from spr_lightning.boxes import Box
from spr_lightning.coords.base import NUM, Codec, Match, box_group_pattern, chunk, numbers

__all__ = ["CogVLMCodec", "FerretCodec", "IntBinCodec", "MiniGPTv2Codec"]

# Floating point must not push an exact bin edge into the bin below when a decoded box is re-encoded.
_EPS = 1e-6


class IntBinCodec(Codec):
    """Shared arithmetic of integer-bin formats: ``q = clamp(floor(v / size * scale), 0, max_value)``.

    Args:
        scale: number the coordinate fraction is multiplied by.
        max_value: largest integer written.
        max_phrase_words: see :class:`~spr_lightning.coords.base.Codec`.
    """

    def __init__(self, scale: int, max_value: int, max_phrase_words: int = 5) -> None:
        super().__init__(max_phrase_words)
        self.scale = scale
        self.max_value = max_value

    def _quantize(self, v: float, size: float) -> int:
        return min(max(math.floor(v / size * self.scale + _EPS), 0), self.max_value)

    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        w, h = image_size
        x1, y1, x2, y2 = values
        s = self.scale
        return (x1 / s * w, y1 / s * h, x2 / s * w, y2 / s * h)

    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        w, h = image_size
        x1, y1, x2, y2 = box
        return (self._quantize(x1, w), self._quantize(y1, h), self._quantize(x2, w), self._quantize(y2, h))


class FerretCodec(IntBinCodec):
    """Ferret: ``a man [100, 200, 300, 400]``; ``int(v / size * 1000)`` clamped to 999, read as ``q / 1000``.

    Each box has its own brackets; several boxes are written ``[a], [b]``.
    """

    name: ClassVar[str] = "ferret"
    _pattern = box_group_pattern()
    _tail = re.compile(r"\[[\d\s.,+-]*\Z")

    def __init__(self, max_phrase_words: int = 5) -> None:
        super().__init__(scale=1000, max_value=999, max_phrase_words=max_phrase_words)

    def _scan(self, text: str) -> list[Match]:
        return [Match(m.span(), chunk(numbers(m.group(0)), 4)) for m in self._pattern.finditer(text)]

    def _render(self, values: list[tuple[float, ...]]) -> str:
        return ", ".join("[{}, {}, {}, {}]".format(*(int(v) for v in box)) for box in values)


class CogVLMCodec(IntBinCodec):
    """CogVLM grounding: ``a man[[086,540,400,760]]``, three-digit zero-padded 000-999, read as ``q / 1000``.

    Several boxes of one phrase share the double brackets, split by ``;`` (``[[a;b]]``, as CogVLM's own
    ``grounding_parser`` splits them). Decoding also accepts ``[[a];[b]]`` and ``[[a],[b]]``.
    """

    name: ClassVar[str] = "cogvlm"
    _quad = rf"{NUM}(?:\s*,\s*{NUM}){{3}}"
    _pattern = re.compile(
        rf"\[\s*\[\s*{_quad}(?:(?:\s*\]\s*[;,]\s*\[\s*|\s*;\s*){_quad})*"
        rf"\s*(?:\]\s*\]|\](?!\s*[;,\[])|[\d\s.,;\[\]+-]*\Z)"
    )
    _tail = re.compile(r"\[\s*\[[\d\s.,;\[\]+-]*\Z")

    def __init__(self, max_phrase_words: int = 5) -> None:
        super().__init__(scale=1000, max_value=999, max_phrase_words=max_phrase_words)

    def _scan(self, text: str) -> list[Match]:
        return [Match(m.span(), chunk(numbers(m.group(0)), 4)) for m in self._pattern.finditer(text)]

    def _render(self, values: list[tuple[float, ...]]) -> str:
        return "[[" + ";".join("{:03d},{:03d},{:03d},{:03d}".format(*(int(v) for v in box)) for box in values) + "]]"


class MiniGPTv2Codec(IntBinCodec):
    """MiniGPT-v2: ``<p>a man</p> {<10><20><30><40>}``, integers 0-100, read as ``q / 100``.

    The phrase is the ``<p>...</p>`` right before the box when there is one (grounded captions), else the word
    rule (REC answers are a bare box). Several boxes of one phrase are joined by ``<delim>``.
    """

    name: ClassVar[str] = "minigpt_v2"
    _box = rf"\{{\s*<\s*{NUM}\s*>(?:\s*<\s*{NUM}\s*>){{3}}\s*(?:\}}|\s*\Z)"
    _pattern = re.compile(rf"(?:<p>(?P<phrase>[^<]*)</p>\s*)?(?P<group>{_box}(?:\s*<delim>\s*{_box})*)")
    _tail = re.compile(r"(?:<delim>\s*)?\{[<>\d\s.+-]*\Z")

    def __init__(self, max_phrase_words: int = 5) -> None:
        super().__init__(scale=100, max_value=100, max_phrase_words=max_phrase_words)

    def _scan(self, text: str) -> list[Match]:
        out = []
        for m in self._pattern.finditer(text):
            phrase = m.group("phrase")
            values = chunk(numbers(m.group("group")), 4)
            if phrase is None:
                out.append(Match(m.span("group"), values))
            else:
                out.append(Match(m.span("group"), values, phrase.strip() or None, marked=True))
        return out

    def _render(self, values: list[tuple[float, ...]]) -> str:
        return "<delim>".join("{{<{}><{}><{}><{}>}}".format(*(int(v) for v in box)) for box in values)

    def _with_phrase(self, group: str, phrase: str | None) -> str:
        return group if phrase is None else f"<p>{phrase}</p> {group}"

    def _unmark(self, text: str) -> str:
        text = re.sub(r"<p>([^<]*)</p>", r"\1", text)
        return re.sub(r"</?p>|<delim>", " ", text)

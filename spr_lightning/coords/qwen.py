"""Qwen formats: Qwen-VL ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` and Qwen2.5-VL JSON
``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` in pixels of the resized model input.

Qwen-VL writes integers in ``[0, 1000)`` (``int(v / size * 1000)``, as its training data) and its own
evaluation reads them back as ``q / 999 * size``; this codec does the same both ways, so ``encode(decode(q))``
gives back ``q`` exactly.

Qwen2.5-VL writes absolute pixels of the image *after* its processor resized it. The processor resizes with
:func:`smart_resize`: both sides rounded to a multiple of ``factor`` (28 = patch 14 x merge 2), then scaled so
the pixel count lies in ``[min_pixels, max_pixels]`` (56*56 and 28*28*1280 by default; checkpoints may
override them in ``preprocessor_config.json``). Pass ``resized_size="smart"`` (with the same
``min_pixels``/``max_pixels`` as the processor), a fixed ``(W', H')``, or a callable ``(W, H) -> (W', H')``;
``None`` means the boxes are already in original pixels (e.g. when the caller resized the image itself).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from spr_lightning.boxes import Box, clamp_box, order_corners
from spr_lightning.coords.base import NUM, Codec, Match, _as_box_list, _is_single_box, chunk, numbers, tidy_spacing

__all__ = ["Qwen2_5VLCodec", "QwenVLCodec", "smart_resize"]


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL processor resize rule; returns ``(height, width)`` like transformers' function.

    Both sides become multiples of ``factor``, the aspect ratio is kept as closely as possible and the pixel
    count is brought into ``[min_pixels, max_pixels]``. Matches
    ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (checked in the tests).

    Raises:
        ValueError: when the aspect ratio exceeds 200, as transformers does.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenVLCodec(Codec):
    """Qwen-VL: ``<ref>a man</ref><box>(100,200),(300,400)</box>``; several boxes follow one ``<ref>``."""

    name: ClassVar[str] = "qwen_vl"
    _box = rf"<box>\s*\(\s*{NUM}\s*,\s*{NUM}\s*\)\s*,?\s*\(\s*{NUM}\s*,\s*{NUM}\s*\)\s*(?:</box>|\s*\Z)"
    _pattern = re.compile(rf"<ref>(?P<phrase>[^<]*)</ref>|(?P<box>{_box})")
    _tail = re.compile(r"<box>[^<]*\Z")

    def _scan(self, text: str) -> list[Match]:
        out: list[Match] = []
        phrase, anchor = None, -1
        for m in self._pattern.finditer(text):
            if m.group("box") is None:
                phrase, anchor = m.group("phrase").strip() or None, m.end()
                continue
            # A <ref> grounds the boxes written right after it, and only those.
            linked = anchor >= 0 and text[anchor : m.start()].strip() == ""
            out.append(Match(m.span(), chunk(numbers(m.group(0)), 4), phrase if linked else None, marked=linked))
            anchor = m.end() if linked else -1
        return out

    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        w, h = image_size
        x1, y1, x2, y2 = values
        return (x1 / 999 * w, y1 / 999 * h, x2 / 999 * w, y2 / 999 * h)

    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        w, h = image_size
        sizes = (w, h, w, h)
        return tuple(min(max(math.floor(v / s * 1000 + 1e-6), 0), 999) for v, s in zip(box, sizes))

    def _render(self, values: list[tuple[float, ...]]) -> str:
        return "".join("<box>({},{}),({},{})</box>".format(*(int(v) for v in box)) for box in values)

    def _with_phrase(self, group: str, phrase: str | None) -> str:
        return group if phrase is None else f"<ref>{phrase}</ref>{group}"

    def _unmark(self, text: str) -> str:
        text = re.sub(r"<ref>([^<]*)</ref>", r"\1", text)
        return re.sub(r"</?(?:ref|box|quad)>", " ", text)


def _bbox_pattern(open_group: str) -> str:
    """``"bbox_2d": [x1, y1, x2, y2]`` with the four numbers in a group opened by ``open_group``."""
    return rf"[\"']?bbox_2d[\"']?\s*:\s*\[\s*{open_group}{NUM}(?:\s*,\s*{NUM}){{3}})\s*\]?"


def _object_pattern(open_group: str) -> str:
    """An object holding a ``bbox_2d``, keys in any order; the closing brace may be missing at the very end."""
    return rf"\{{[^{{}}]*?{_bbox_pattern(open_group)}[^{{}}]*?(?:\}}|\Z)"


_BBOX = _bbox_pattern("(?P<nums>")
_OBJ = _object_pattern("(?P<nums>")
_LABEL = re.compile(r"[\"']?label[\"']?\s*:\s*\"((?:[^\"\\]|\\.)*)\"?")
_FENCE = re.compile(r"```(?:json)?")


def _label(obj_text: str) -> str | None:
    m = _LABEL.search(obj_text)
    if m is None:
        return None
    try:
        label = json.loads(f'"{m.group(1)}"')
    except ValueError:  # a truncated escape: keep the raw characters
        label = m.group(1)
    return label.strip() or None


ResizedSize = tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]] | str | None


class Qwen2_5VLCodec(Codec):  # noqa: N801 - the model's name
    """Qwen2.5-VL: ``{"bbox_2d": [x1, y1, x2, y2], "label": "a man"}`` in pixels of the resized input.

    Args:
        resized_size: how original pixels map to the model's: ``None`` (identity), ``(W', H')``, a callable
            ``(W, H) -> (W', H')``, or ``"smart"`` for :func:`smart_resize` with the options below.
        factor: ``smart_resize`` factor (patch size x merge size).
        min_pixels: ``smart_resize`` lower pixel bound.
        max_pixels: ``smart_resize`` upper pixel bound.
        max_phrase_words: unused (the phrase is the ``label``), kept for a uniform signature.
    """

    name: ClassVar[str] = "qwen2_5_vl"
    _obj = re.compile(_OBJ)
    _array = re.compile(rf"\[\s*(?:{_object_pattern('(?:')}\s*,?\s*)+(?:\]|\Z)")
    _tail = re.compile(r"\{[^{}]*\Z")

    def __init__(
        self,
        resized_size: ResizedSize = None,
        factor: int = 28,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        max_phrase_words: int = 5,
    ) -> None:
        super().__init__(max_phrase_words)
        if isinstance(resized_size, str) and resized_size != "smart":
            raise ValueError(f"resized_size must be None, (W', H'), a callable or 'smart', got {resized_size!r}")
        self.resized_size = resized_size
        self.factor = factor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def model_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(W', H')``: the size of the image the model sees, in whose pixels it writes boxes."""
        if self.resized_size is None:
            return image_size
        if self.resized_size == "smart":
            w, h = image_size
            h2, w2 = smart_resize(int(h), int(w), self.factor, self.min_pixels, self.max_pixels)
            return w2, h2
        if callable(self.resized_size):
            return tuple(self.resized_size(image_size))  # type: ignore[return-value]
        return tuple(self.resized_size)  # type: ignore[return-value, arg-type]

    def _scan(self, text: str) -> list[Match]:
        return [
            Match(m.span(), chunk(numbers(m.group("nums")), 4), _label(m.group(0)), marked=True)
            for m in self._obj.finditer(text)
        ]

    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        (w, h), (w2, h2) = image_size, self.model_size(image_size)
        x1, y1, x2, y2 = values
        return (x1 * w / w2, y1 * h / h2, x2 * w / w2, y2 * h / h2)

    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        (w, h), (w2, h2) = image_size, self.model_size(image_size)
        x1, y1, x2, y2 = box
        return (round(x1 * w2 / w), round(y1 * h2 / h), round(x2 * w2 / w), round(y2 * h2 / h))

    def _render(self, values: list[tuple[float, ...]], label: str | None = None) -> str:
        objs = [{"bbox_2d": [int(v) for v in box], **({} if label is None else {"label": label})} for box in values]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)

    def encode(
        self,
        boxes: Sequence[float] | Sequence[Sequence[float]],
        image_size: tuple[int, int],
        phrase: str | None = None,
    ) -> str:
        """One box -> one JSON object; a sequence of boxes -> a JSON array of objects, each with ``label``."""
        single = _is_single_box(boxes)
        values = [self._from_pixels(clamp_box(order_corners(b), image_size), image_size) for b in _as_box_list(boxes)]
        if single:
            return self._render(values, phrase)
        return "[" + ", ".join(self._render([v], phrase) for v in values) + "]"

    def _rerender(self, group_text: str, match: Match, values: list[tuple[float, ...]]) -> str:
        # Only the numbers change; other keys of the object (label, extra fields) stay as the model wrote them.
        m = re.search(_BBOX, group_text)
        if m is None:  # cannot happen for a scanned object; keep the text rather than lose it
            return group_text
        start, end = m.span("nums")
        rest = group_text[end:]
        nums = ", ".join(str(int(v)) for v in values[0]) + ("" if re.match(r"\s*\]", rest) else "]")
        return group_text[:start] + nums + rest

    def strip(self, text: str) -> str:
        """Labels instead of JSON: an array of objects becomes ``"label, label"``, an object its label."""
        text = _FENCE.sub("", text)
        tail = self._tail.search(text)
        if tail is not None and self._obj.search(text, tail.start()) is None:
            text = text[: tail.start()]  # an object cut off before its box was complete
        text = self._array.sub(lambda m: ", ".join(filter(None, map(_label, self._obj_texts(m.group(0))))), text)
        text = self._obj.sub(lambda m: _label(m.group(0)) or "", text)
        return tidy_spacing(text)

    def _obj_texts(self, array_text: str) -> list[str]:
        return [m.group(0) for m in self._obj.finditer(array_text)]

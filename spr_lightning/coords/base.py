"""The codec contract shared by every box-in-text format, and the text handling they have in common.

A codec turns pixel boxes into the characters a model writes (``encode``) and reads them back out of
generated text (``decode``), forgivingly: model output is never trusted to be well formed, so decoding
never raises and simply skips what it cannot read. Subclasses only describe their format:

* ``_scan(text)`` finds each *group* of boxes (several boxes can share one bracket, e.g. CogVLM's
  ``[[a;b]]``) with its raw numbers, its character span and, where the format marks one, its phrase;
* ``_to_pixels`` / ``_from_pixels`` map one box's raw numbers to and from pixels;
* ``_render`` writes one group from raw numbers.

Everything else (phrase rule, corner ordering, clamping, stripping, re-inserting boxes) lives here, so the
formats behave the same way where they can.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from spr_lightning.boxes import Box, clamp_box, order_corners

__all__ = ["NUM", "Codec", "Grounding", "Match", "box_group_pattern", "chunk", "numbers", "tidy_spacing"]

#: One number as models write it: optional sign, integer or decimal (no exponent: no model writes one).
NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUM_RE = re.compile(NUM)

# Text between two box groups that still means "the same phrase", e.g. "two cups [a], [b] and [c]".
_JOINER = re.compile(r"[\s,;]*(?:(?:and|or|&)[\s,;]*)?", re.IGNORECASE)
# Where a phrase cannot extend past, looking back from a box.
_BOUNDARY = re.compile(r"[.!?;:,\n()\[\]{}\"]")
# Trailing words that link a phrase to its box rather than belong to it ("the dog is at [...]").
_LINK_WORDS = frozenset({"at", "is", "are", "was", "were", "located", "in", "on", "of", "by", "to", "from", "with"})
# Words after which a new noun phrase starts ("there is | a man", "a man with | a hat").
_CLAUSE_WORDS = frozenset(
    {"is", "are", "was", "were", "has", "have", "had", "with", "and", "or", "there", "which", "who", "while", "where"}
)
# Characters after a removed box that make the space before it redundant.
_AFTER = " .,;:!?\n"


@dataclass(frozen=True)
class Grounding:
    """One box read out of a text.

    Attributes:
        xyxy: the box in pixels of the original image, corners ordered and clamped to the image.
        span: ``(start, end)`` character offsets of the box's text (``text[start:end]``). Boxes written in
            one group (CogVLM ``[[a;b]]``, Shikra ``[a;b]``, MiniGPT-v2 ``{a}<delim>{b}``) share the span.
        phrase: the words the box grounds, where known (see :meth:`Codec.decode`), else ``None``.
    """

    xyxy: Box
    span: tuple[int, int]
    phrase: str | None = None


@dataclass(frozen=True)
class Match:
    """One group of boxes as written in a text (what a codec's ``_scan`` returns).

    Attributes:
        span: character offsets of the group.
        values: the raw numbers of each box in the group, as written (not yet in pixels).
        phrase: the phrase the format marks for this group (``<ref>``, ``<p>``, ``label``), if any.
        marked: True when the format has a phrase slot, so the word-window rule must not be applied.
    """

    span: tuple[int, int]
    values: tuple[tuple[float, ...], ...]
    phrase: str | None = None
    marked: bool = False


def box_group_pattern(
    open_: str = r"\[", close: str = r"\]", sep: str = r",", group_sep: str | None = None, n: int = 4
) -> re.Pattern[str]:
    """Regex for ``open n1 sep n2 ... close`` (optionally several boxes split by ``group_sep``), forgiving.

    Spaces are allowed around every number and separator. The closing bracket may be missing at the very end
    of the text (a truncated generation); a half-written box after a group separator is swallowed into the
    match there too, and dropped later by :func:`chunk`.
    """
    box = rf"{NUM}(?:\s*{sep}\s*{NUM}){{{n - 1}}}"
    more = "" if group_sep is None else rf"(?:\s*{group_sep}\s*{box})*"
    tail = r"\s*\Z" if group_sep is None else rf"(?:\s*{group_sep}[\d\s.,+-]*)?\s*\Z"
    return re.compile(rf"{open_}\s*{box}{more}\s*(?:{close}|{tail})")


def numbers(text: str) -> list[float]:
    """Every number in ``text``, in order (a helper for ``_scan`` implementations)."""
    return [float(v) for v in _NUM_RE.findall(text)]


def chunk(values: Sequence[float], size: int) -> tuple[tuple[float, ...], ...]:
    """Split ``values`` into tuples of ``size``, dropping an incomplete last one (a truncated box)."""
    return tuple(tuple(values[i : i + size]) for i in range(0, len(values) - size + 1, size))


def tidy_spacing(text: str) -> str:
    """Collapse runs of spaces, drop spaces before closing punctuation and after opening brackets, trim."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|\{\s*\}", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([.,;:!?)\]}])", r"\1", text)
    text = re.sub(r"([(\[{]) ", r"\1", text)
    text = re.sub(r"[,;:]+(?=[.!?,;:])", "", text)
    text = re.sub(r" *\n *", "\n", text)
    return text.strip()


def _is_single_box(boxes: Sequence[float] | Sequence[Sequence[float]]) -> bool:
    """True for one box (four numbers, list/tuple/1-d tensor), False for a sequence of boxes."""
    if len(boxes) == 0:
        return False
    first = boxes[0]
    return isinstance(first, (int, float)) or getattr(first, "ndim", None) == 0


def _as_box_list(boxes: Sequence[float] | Sequence[Sequence[float]]) -> list[Box]:
    """Accept one box or a sequence of boxes; always return a non-empty list of boxes."""
    if len(boxes) == 0:
        raise ValueError("encode needs at least one box")
    if _is_single_box(boxes):
        boxes = [boxes]  # type: ignore[list-item]
    out = []
    for box in boxes:
        values = tuple(float(v) for v in box)  # type: ignore[union-attr]
        if len(values) != 4:
            raise ValueError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(values)}")
        out.append(values)
    return out  # type: ignore[return-value]


class Codec(ABC):
    """Base class of the box-in-text formats; see the module docstring for what subclasses provide.

    Args:
        max_phrase_words: longest phrase the word-window rule returns (formats without a phrase slot).
    """

    name: ClassVar[str] = ""
    #: An unfinished box at the very end of a truncated generation, removed by :meth:`strip`.
    _tail: ClassVar[re.Pattern[str] | None] = None

    def __init__(self, max_phrase_words: int = 5) -> None:
        self.max_phrase_words = max_phrase_words

    # ----------------------------------------------------------------- what a format must describe
    @abstractmethod
    def _scan(self, text: str) -> list[Match]:
        """Every box group in ``text``, in order of position."""

    @abstractmethod
    def _to_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box:
        """Raw numbers of one box -> pixel xyxy (unordered, unclamped; ordering/clamping happen after)."""

    @abstractmethod
    def _from_pixels(self, box: Box, image_size: tuple[int, int]) -> tuple[float, ...]:
        """Pixel xyxy (ordered, inside the image) -> the raw numbers the format writes."""

    @abstractmethod
    def _render(self, values: list[tuple[float, ...]]) -> str:
        """Text of one group holding the given boxes (raw numbers)."""

    def _with_phrase(self, group: str, phrase: str | None) -> str:
        """Attach a phrase to an encoded group; plain formats write it in front."""
        return group if phrase is None else f"{phrase} {group}"

    def _unmark(self, text: str) -> str:
        """Remove format markup other than boxes (``<ref>`` tags and the like) for :meth:`strip`."""
        return text

    def _rerender(self, group_text: str, match: Match, values: list[tuple[float, ...]]) -> str:
        """Text replacing an existing group in :meth:`replace`; formats with extra fields keep them."""
        return self._render(values)

    # ------------------------------------------------------------------------------- public API
    def encode(
        self,
        boxes: Sequence[float] | Sequence[Sequence[float]],
        image_size: tuple[int, int],
        phrase: str | None = None,
    ) -> str:
        """Write pixel box(es) the way the model writes them.

        Args:
            boxes: one pixel xyxy box, or a sequence of them (written as one group where the format groups
                boxes, else one after the other).
            image_size: ``(W, H)`` of the image the boxes are in.
            phrase: optional phrase, placed where the format puts it (in front, or in its ``<ref>``/``<p>``/
                ``label`` slot).

        Returns:
            The box text. Boxes are corner-ordered and clamped to the image first.
        """
        box_list = _as_box_list(boxes)
        values = [self._from_pixels(clamp_box(order_corners(b), image_size), image_size) for b in box_list]
        return self._with_phrase(self._render(values), phrase)

    def decode(self, text: str, image_size: tuple[int, int]) -> list[Grounding]:
        """Read every box out of ``text``; never raises on model output.

        Unreadable groups are skipped, swapped corners are ordered and boxes are clamped to the image. The
        phrase is the format's own (``<ref>``, ``<p>``, ``label``) where it has one; otherwise the words
        right before the box: the text since the previous box or the last clause boundary
        (``. , ; : ! ?``, newline, brackets, quotes), trailing linking words ("at", "is", "located", ...)
        dropped, starting after the last clause word ("is", "are", "has", "with", "and", "there", ...), at
        most ``max_phrase_words`` words: "There is a man [b]" -> "a man", "a man with a hat [b]" -> "a hat".
        A group that directly follows another one (only spaces, commas, "and"/"or" between) shares its
        phrase: "two cups [a], [b]" grounds "two cups" twice.

        Args:
            text: generated or annotated text.
            image_size: ``(W, H)`` of the image the text talks about.

        Returns:
            One :class:`Grounding` per box, in text order; ``[]`` when there is none.
        """
        return [g for _, found in self._read(text, image_size) for g in found]

    def strip(self, text: str) -> str:
        """Plain text: boxes and markup removed, spacing tidied (no double spaces, none before punctuation).

        Adjacent groups joined by commas or "and" go together, so "two cups [a], [b] on" becomes "two cups on".
        An unfinished box at the end of a truncated generation is removed as well.
        """
        spans = self._merged_spans([m.span for m in self._scan(text)], text)
        out, pos = [], 0
        for start, end in spans:
            out.append(text[pos:start])
            pos = end
        out.append(text[pos:])
        plain = "".join(out)
        if self._tail is not None:
            plain = self._tail.sub("", plain)
        return tidy_spacing(self._unmark(plain))

    def replace(
        self,
        text: str,
        new_boxes: Sequence[Sequence[float] | None],
        image_size: tuple[int, int],
    ) -> str:
        """Put new pixel boxes in place of the boxes of ``text``, keeping everything else as written.

        ``new_boxes`` lines up with ``decode(text, image_size)``: entry ``i`` replaces grounding ``i``; ``None``
        removes that box (a group losing all its boxes disappears). Groups are re-written in the format's
        canonical spelling. This is how refined boxes go back into a description (SPR §3.2).

        Raises:
            ValueError: when ``len(new_boxes)`` differs from the number of decoded boxes (a caller bug, not
                bad model output).
        """
        read = [(m, found) for m, found in self._read(text, image_size) if found]  # unreadable: left as is
        total = sum(len(found) for _, found in read)
        if len(new_boxes) != total:
            raise ValueError(f"text has {total} decodable boxes but {len(new_boxes)} replacements were given")
        edits: list[tuple[int, int, str]] = []
        i, consumed = 0, 0
        for j, (match, found) in enumerate(read):
            start, end = match.span
            chosen = [b for b in new_boxes[i : i + len(found)] if b is not None]
            i += len(found)
            if chosen:
                values = [self._from_pixels(clamp_box(order_corners(b), image_size), image_size) for b in chosen]
                edits.append((start, end, self._rerender(text[start:end], match, values)))
                continue
            # A removed group takes one joiner (", ", " and ") with it, so "[a], [b]" minus b is "[a]".
            prev_end = read[j - 1][0].span[1] if j > 0 else -1
            next_start = read[j + 1][0].span[0] if j + 1 < len(read) else -1
            forward = False
            if prev_end >= consumed and prev_end >= 0 and _JOINER.fullmatch(text[prev_end:start]):
                start = prev_end
            elif next_start >= 0 and _JOINER.fullmatch(text[end:next_start]):
                end, forward = next_start, True
            if edits and edits[-1][2] == "" and edits[-1][1] >= start:  # a run of removed groups: one edit
                start = min(start, edits.pop()[0])
            if not forward and start > 0 and text[start - 1] == " " and (end == len(text) or text[end] in _AFTER):
                start -= 1  # no double space or space before punctuation left behind
            edits.append((start, end, ""))
            consumed = end
        out, pos = [], 0
        for start, end, piece in edits:
            out.append(text[pos:start] + piece)
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def rewrite(
        self,
        text: str,
        image_size: tuple[int, int],
        fn: Callable[[Grounding], Sequence[float] | None],
    ) -> str:
        """:meth:`replace` with ``fn(grounding) -> new pixel box or None`` called on each decoded box."""
        return self.replace(text, [fn(g) for g in self.decode(text, image_size)], image_size)

    # ---------------------------------------------------------------------------------- helpers
    def _read(self, text: str, image_size: tuple[int, int]) -> list[tuple[Match, list[Grounding]]]:
        """Each scanned group with the groundings it yields (possibly none)."""
        if not isinstance(text, str):
            return []
        out: list[tuple[Match, list[Grounding]]] = []
        prev_end, prev_phrase, has_prev = 0, None, False
        for match in self._scan(text):
            if match.marked:
                phrase = match.phrase
            else:
                phrase = self._rule_phrase(text, prev_end, match.span[0], prev_phrase if has_prev else None)
            found = []
            for values in match.values:
                box = self._safe_pixels(values, image_size)
                if box is not None:
                    found.append(Grounding(box, match.span, phrase))
            out.append((match, found))
            prev_end, prev_phrase, has_prev = match.span[1], phrase, True
        return out

    def _safe_pixels(self, values: tuple[float, ...], image_size: tuple[int, int]) -> Box | None:
        try:
            box = self._to_pixels(values, image_size)
        except (ValueError, ArithmeticError, IndexError):
            return None
        if not all(math.isfinite(v) for v in box):
            return None
        return clamp_box(order_corners(box), image_size)

    def _rule_phrase(self, text: str, start: int, end: int, prev_phrase: str | None) -> str | None:
        segment = text[start:end]
        if prev_phrase is not None and _JOINER.fullmatch(segment):
            return prev_phrase
        segment = self._unmark(segment)
        cuts = [m.end() for m in _BOUNDARY.finditer(segment)]
        words = segment[cuts[-1] if cuts else 0 :].split()
        while words and words[-1].lower().strip("'\"") in _LINK_WORDS:
            words.pop()
        starts = [i + 1 for i, word in enumerate(words) if word.lower() in _CLAUSE_WORDS]
        words = words[starts[-1] if starts else 0 :]
        phrase = " ".join(words[-self.max_phrase_words :]).strip(" '\"`*-")
        return phrase or None

    @staticmethod
    def _merged_spans(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and _JOINER.fullmatch(text[merged[-1][1] : start]):
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"

"""Captions that mention several objects, with the character span and objects of every phrase.

Two uses: phrase-grounding captions ("A red circle, two small blue squares and a green triangle.", the
Flickr30k Entities layout), and object listings that become grounded region/image descriptions for SFT once
:func:`ground_caption` writes each phrase's boxes after it with a coordinate codec.

A phrase always names *every* object its description matches ("two blue squares" when there are two), so its
ground truth is complete, as Flickr30k Entities boxes all instances of a plural phrase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spr_lightning.coords import Codec
from spr_lightning.shapes.referring import FORMS, describe, matching
from spr_lightning.shapes.scene import ShapeObject

__all__ = ["Caption", "ground_caption", "join_phrases", "listing_caption", "make_caption", "noun_phrase"]

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
#: How a caption names each background texture.
BACKGROUND_WORDS = {"gradient": "shaded", "stripes": "striped", "checker": "checkered", "noise": "mottled"}
_TEMPLATES = ("{L}.", "The picture shows {l}.", "I can see {l} on a {bg} background.", "{L} on a {bg} background.")


@dataclass(frozen=True)
class Caption:
    """A caption and its phrases: ``spans[i]`` are the character offsets of phrase ``i`` in ``text`` and
    ``groups[i]`` the indices of the objects it names (in reading order)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def phrases(self) -> list[str]:
        return [self.text[s:e] for s, e in self.spans]


def noun_phrase(words: str, count: int) -> str:
    """``("red circle", 1)`` -> ``"a red circle"``; ``("orange star", 1)`` -> ``"an orange star"``;
    ``("red circle", 2)`` -> ``"two red circles"`` (every shape noun takes a plain ``-s``)."""
    if count == 1:
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
    return f"{_NUMBERS.get(count, 'several')} {words}s"


def join_phrases(phrases: Sequence[str]) -> str:
    """``"a, b and c"``."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _reading_order(objects: Sequence[ShapeObject], indices: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (objects[i].center[1], objects[i].center[0], i))


def _assemble(template: str, phrases: Sequence[str], groups: Sequence[tuple[int, ...]], bg: str) -> Caption:
    """Fill ``template`` (``{L}``: the capitalised list, ``{l}``: lower case) and locate each phrase."""
    before, _, after = template.replace("{L}", "{l}").partition("{l}")
    capital = template.startswith("{L}")
    words = [p[0].upper() + p[1:] if capital and i == 0 else p for i, p in enumerate(phrases)]
    text, spans = before, []
    for i, phrase in enumerate(words):
        if i:
            text += " and " if i == len(words) - 1 else ", "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return Caption(text + after.format(bg=bg), tuple(spans), tuple(groups))


def make_caption(
    objects: Sequence[ShapeObject], background: str, rng: np.random.Generator, max_phrases: int = 4
) -> Caption:
    """A caption naming 2..``max_phrases`` disjoint groups of objects, each described by a random form.

    Phrases describe at most four objects each and never share an object, so every box belongs to one phrase.
    """
    target = int(rng.integers(2, max_phrases + 1))
    used: set[int] = set()
    phrases, groups = [], []
    for start in rng.permutation(len(objects)).tolist():
        if len(groups) == target:
            break
        if start in used:
            continue
        form = FORMS[int(rng.integers(len(FORMS)))]
        group = matching(objects, objects[start], form)
        if len(group) > 4 or used.intersection(group):
            continue
        used.update(group)
        phrases.append(noun_phrase(describe(objects[start], form), len(group)))
        groups.append(tuple(_reading_order(objects, group)))
    if not groups:  # every description matched more than four objects: name one object by its full label
        return listing_caption(objects, [0])
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _assemble(template, phrases, groups, BACKGROUND_WORDS.get(background, background))


def listing_caption(objects: Sequence[ShapeObject], indices: Sequence[int]) -> Caption:
    """"A small red triangle, two large blue circles and a small green star.": the given objects by full label,
    grouped by label, in reading order (top to bottom, then left to right) of each label's first object."""
    groups: dict[str, list[int]] = {}
    for i in _reading_order(objects, indices):
        groups.setdefault(objects[i].label, []).append(i)
    phrases = [noun_phrase(label, len(members)) for label, members in groups.items()]
    return _assemble("{L}.", phrases, [tuple(m) for m in groups.values()], "")


def ground_caption(
    caption: Caption, objects: Sequence[ShapeObject], codec: Codec, image_size: tuple[int, int]
) -> tuple[str, list[list[int]]]:
    """The caption with each phrase's boxes written by ``codec`` (``"a red circle [120, 40, 230, 160]"``;
    formats with a phrase slot put the phrase there: ``<ref>a red circle</ref><box>...</box>``).

    Returns:
        ``(text, boxes)``: the grounded text and the pixel boxes in the order they are written, which is the
        order ``codec.decode`` reads them back.
    """
    out, boxes, pos = [], [], 0
    for (start, end), group in zip(caption.spans, caption.groups):
        group_boxes = [list(objects[i].box) for i in group]
        out.append(caption.text[pos:start])
        out.append(codec.encode(group_boxes, image_size, phrase=caption.text[start:end]))
        boxes.extend(group_boxes)
        pos = end
    out.append(caption.text[pos:])
    return "".join(out), boxes

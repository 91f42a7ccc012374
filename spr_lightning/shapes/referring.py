"""Referring expressions with exactly one target: by attributes when they single it out, else by a relation.

A REC benchmark is only fair when every expression names one object and no other. Two kinds are written:

* **attribute** ("the small red triangle", "the star"): a description form (shape; colour + shape;
  size + shape; size + colour + shape) that matches the target and nothing else in the image. The shortest
  such form is written, and the full label too when it differs (RefCOCO refs also carry several sentences).
* **relation** ("the circle left of the green square", "the red square above the yellow star"): the target's
  description matches several objects (the *candidates*), the anchor is described uniquely, and the target is
  the only candidate on that side of the anchor. Relations compare box centres, with a margin: the target is
  at least ``margin`` px on that side, every other candidate is on the other side or level (offset <= 0). A
  reader who takes "left of" loosely (any positive offset) still finds exactly the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spr_lightning.shapes.scene import ShapeObject

__all__ = [
    "FORMS",
    "RELATIONS",
    "ReferringExpression",
    "describe",
    "matching",
    "referring_expressions",
]

#: Description forms from least to most specific; words are always written size, colour, shape.
FORMS: tuple[tuple[str, ...], ...] = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class ReferringExpression:
    """One expression for one target object (indices into the scene's objects).

    Attributes:
        text: e.g. ``"the blue circle left of the green square"``.
        target: index of the referred object.
        kind: ``"attribute"`` or ``"relation"``.
        form: attributes used to describe the target.
        relation: one of :data:`RELATIONS` (relation expressions only).
        anchor: index of the anchor object (relation expressions only).
        anchor_form: attributes describing the anchor (relation expressions only).
    """

    text: str
    target: int
    kind: str
    form: tuple[str, ...]
    relation: str | None = None
    anchor: int | None = None
    anchor_form: tuple[str, ...] | None = None


def describe(obj: ShapeObject, form: Sequence[str]) -> str:
    """``obj``'s words for ``form`` in the fixed order size, colour, shape: ``"small red triangle"``."""
    return " ".join(getattr(obj, attr) for attr in ("size", "color", "shape") if attr in form)


def matching(objects: Sequence[ShapeObject], obj: ShapeObject, form: Sequence[str]) -> list[int]:
    """Indices of the objects that ``describe(obj, form)`` also describes (``obj`` itself included)."""
    return [i for i, o in enumerate(objects) if all(getattr(o, a) == getattr(obj, a) for a in form)]


class _Lookup:
    """Which objects each description form matches, computed once per scene (the expression search asks the
    same questions for every target and anchor)."""

    def __init__(self, objects: Sequence[ShapeObject]) -> None:
        self.objects = objects
        self.groups: dict[tuple[tuple[str, ...], str], list[int]] = {}
        for i, obj in enumerate(objects):
            for form in FORMS:
                self.groups.setdefault((form, describe(obj, form)), []).append(i)
        self.unique = [[f for f in FORMS if self.matching(i, f) == [i]] for i in range(len(objects))]
        cx = np.asarray([o.center[0] for o in objects], dtype=np.float64)
        cy = np.asarray([o.center[1] for o in objects], dtype=np.float64)
        # offsets[relation][t][a]: px that t's centre lies on the relation side of a's (nested lists: fast to index)
        self.offsets = {
            "left of": (cx[None, :] - cx[:, None]).tolist(),
            "right of": (cx[:, None] - cx[None, :]).tolist(),
            "above": (cy[None, :] - cy[:, None]).tolist(),
            "below": (cy[:, None] - cy[None, :]).tolist(),
        }

    def matching(self, index: int, form: tuple[str, ...]) -> list[int]:
        return self.groups[(form, describe(self.objects[index], form))]


def _attribute_expressions(lookup: _Lookup, index: int) -> list[ReferringExpression]:
    """The shortest unique description of the object, then the full label if it is unique and longer; ``[]``
    when some other object has the same size, colour and shape."""
    forms = lookup.unique[index]
    chosen = forms[:1] + [f for f in forms[1:] if f == FORMS[-1]]
    obj = lookup.objects[index]
    return [ReferringExpression(f"the {describe(obj, f)}", index, "attribute", f) for f in chosen]


def _relational_expressions(lookup: _Lookup, index: int, margin: float) -> list[ReferringExpression]:
    """Every unambiguous relation expression for the object (see the module docstring for the rule).

    Only forms that match several objects are used (a relation adds nothing to a unique description), and
    the anchor is never one of the candidates, so "the circle left of the circle" cannot occur.
    """
    objects = lookup.objects
    target = objects[index]
    anchors = [(a, lookup.unique[a][0]) for a in range(len(objects)) if a != index and lookup.unique[a]]
    found = []
    for form in FORMS:
        candidates = lookup.matching(index, form)
        if len(candidates) < 2:
            continue
        others = [c for c in candidates if c != index]
        for anchor, anchor_form in anchors:
            if anchor in candidates:
                continue
            for relation in RELATIONS:
                offset = lookup.offsets[relation]
                if offset[index][anchor] < margin or any(offset[c][anchor] > 0 for c in others):
                    continue
                text = f"the {describe(target, form)} {relation} the {describe(objects[anchor], anchor_form)}"
                found.append(ReferringExpression(text, index, "relation", form, relation, anchor, anchor_form))
    return found


def referring_expressions(
    objects: Sequence[ShapeObject],
    image_size: tuple[int, int],
    rng: np.random.Generator,
    margin_frac: float = 0.08,
    max_relational: int = 2,
) -> dict[int, list[ReferringExpression]]:
    """The expressions of each object that can be referred to, ``{object index: [expressions]}``.

    An object with a unique description gets its attribute expressions and one relation expression when
    there is one; an object whose full label is shared gets up to ``max_relational`` relation expressions
    (different relations or anchors); an object with neither is left out. Among relation expressions the
    shortest target description is preferred ("the circle left of ..." over "the small red circle left of ...").

    Args:
        objects: the scene's objects.
        image_size: ``(W, H)``; the margin is ``margin_frac`` of the short side.
        rng: picks among equally short relation expressions.
        margin_frac: how far past the anchor's centre the target's centre must be.
        max_relational: relation expressions per object whose attributes are not unique.
    """
    margin = margin_frac * min(image_size)
    lookup = _Lookup(objects)
    out: dict[int, list[ReferringExpression]] = {}
    for index in range(len(objects)):
        attributes = _attribute_expressions(lookup, index)
        relations = _relational_expressions(lookup, index, margin)
        if relations:
            shortest = min(len(r.form) for r in relations)
            relations = [r for r in relations if len(r.form) == shortest]
            order = rng.permutation(len(relations))
            relations = [relations[i] for i in order[: 1 if attributes else max_relational]]
        if attributes or relations:
            out[index] = attributes + relations
    return out

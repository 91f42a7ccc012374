"""A small built-in text corpus for training the tiny tokenizers offline.

The tiny models are random, so the tokenizers only need to *cover* the text the pipeline produces:
region descriptions, object names, spatial words and boxes in every coordinate format SPR uses
(0-999 bins, 0-1 floats, absolute pixels, Qwen-style JSON). Training on this keeps common words as single
tokens and sequence lengths short, which keeps the tiny smoke tests fast.
"""

from __future__ import annotations

import random

OBJECTS = (
    "person man woman boy girl child people player dog cat horse cow sheep bird elephant bear zebra giraffe "
    "car bus truck bicycle motorcycle train boat airplane chair couch table bed bench umbrella bottle cup bowl "
    "plate pizza sandwich cake banana apple orange laptop phone keyboard book clock vase tree sky grass road "
    "building window door sign light pole fence wall floor water shirt hat jacket bag ball kite surfboard"
).split()
COLORS = "red blue green yellow white black brown gray orange pink purple dark light".split()
SPATIAL = (
    "left right top bottom middle center front back behind near next above below under beside between "
    "corner edge far close inside outside"
).split()
VERBS = "is holding sitting standing walking riding wearing looking eating playing lying running".split()
TEMPLATES = (
    "a {c} {o} on the {s}",
    "the {o} {v} {s} the {o2}",
    "{o} in a {c} shirt",
    "Please provide the bounding box of the region this sentence describes: {c} {o}.",
    "Describe the region {box} in detail.",
    "There is a {c} {o} at {box} and a {o2} at {box2}.",
    "What is in the {s} of the image? A {o} {v} near the {o2}.",
    "The image shows {o}s and a {c} {o2}. The {o} is {s} the {o2}.",
    "Question: where is the {o}? Answer: {box}",
    "USER: <image>\nWhat is the {o} doing? ASSISTANT: The {o} is {v}.",
)


def _box(rng: random.Random) -> str:
    """Format one random box in one of the coordinate formats the codecs write (see ``spr_lightning.boxes``)."""
    kind = rng.randrange(4)
    if kind == 0:  # 0-1 floats (Shikra / LocVLM-NFP)
        vals = sorted(rng.random() for _ in range(4))
        return "[" + ", ".join(f"{v:.2f}" for v in vals) + "]"
    if kind == 1:  # 0-999 bins (Ferret / CogVLM)
        return "[" + ", ".join(str(rng.randrange(1000)) for _ in range(4)) + "]"
    if kind == 2:  # absolute pixels as (x1,y1),(x2,y2)
        x1, y1, x2, y2 = (rng.randrange(640) for _ in range(4))
        return f"({x1},{y1}),({x2},{y2})"
    x1, y1, x2, y2 = (rng.randrange(1280) for _ in range(4))  # Qwen2.5-VL JSON with absolute pixels
    return '{"bbox_2d": [' + f"{x1}, {y1}, {x2}, {y2}" + '], "label": "' + rng.choice(OBJECTS) + '"}'


def training_corpus(num_lines: int = 3000) -> list[str]:
    """Return a fixed list of sentences (independent of any model seed, so tokenizers never change).

    Args:
        num_lines: How many sentences to generate; 3000 trains a ~1k BPE vocab in well under a second.

    Returns:
        The same list on every call.
    """
    rng = random.Random(1234)
    lines = [" ".join(OBJECTS), " ".join(COLORS), " ".join(SPATIAL), " ".join(VERBS), "0123456789 .,;:!?()[]{}<>"]
    for _ in range(num_lines):
        template = rng.choice(TEMPLATES)
        lines.append(
            template.format(
                c=rng.choice(COLORS),
                o=rng.choice(OBJECTS),
                o2=rng.choice(OBJECTS),
                s=rng.choice(SPATIAL),
                v=rng.choice(VERBS),
                box=_box(rng),
                box2=_box(rng),
            )
        )
    return lines


def wordpiece_words() -> list[str]:
    """Whole words for the tiny BERT (GroundingDINO text tower) vocabulary, in a fixed order."""
    words = OBJECTS + COLORS + SPATIAL + VERBS + "a an the of and in on at with to is are this that".split()
    return list(dict.fromkeys(w.lower() for w in words))

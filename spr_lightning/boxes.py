"""Box conversions on plain Python boxes: formats, corner order, clamping, normalisation, square padding.

Why plain tuples: the grounding-text codecs, region sampling and shard schemas all handle one box at a time as
JSON-friendly numbers; tensor batches go through ``torchvision.ops.box_convert`` or the ``kernels`` package
instead. A box is four floats; its format is named where it matters:

* ``xyxy``: ``(x1, y1, x2, y2)``, top-left and bottom-right corners (what every codec and metric uses);
* ``xywh``: ``(x, y, w, h)``, top-left corner and size (COCO annotations);
* ``cxcywh``: ``(cx, cy, w, h)``, centre and size (DETR / GroundingDINO outputs).

Image sizes are always ``(W, H)``, as PIL's ``Image.size``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "Box",
    "BOX_FORMATS",
    "convert_box",
    "order_corners",
    "clamp_box",
    "normalize_box",
    "denormalize_box",
    "box_area",
    "enclosing_box",
    "square_pad_geometry",
    "to_square_padded",
    "from_square_padded",
]

Box = tuple[float, float, float, float]
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def _to_xyxy(box: Sequence[float], fmt: str) -> Box:
    a, b, c, d = (float(v) for v in box)
    if fmt == "xyxy":
        return (a, b, c, d)
    if fmt == "xywh":
        return (a, b, a + c, b + d)
    if fmt == "cxcywh":
        return (a - c / 2, b - d / 2, a + c / 2, b + d / 2)
    raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")


def _from_xyxy(box: Box, fmt: str) -> Box:
    x1, y1, x2, y2 = box
    if fmt == "xyxy":
        return box
    if fmt == "xywh":
        return (x1, y1, x2 - x1, y2 - y1)
    if fmt == "cxcywh":
        return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")


def convert_box(box: Sequence[float], in_fmt: str, out_fmt: str) -> Box:
    """Convert one box between ``xyxy``, ``xywh`` and ``cxcywh`` (same names as ``torchvision.ops.box_convert``).

    Args:
        box: four numbers in ``in_fmt``.
        in_fmt: format of ``box``.
        out_fmt: wanted format.

    Returns:
        The box in ``out_fmt`` as a tuple of floats.

    Raises:
        ValueError: on an unknown format name.
    """
    return _from_xyxy(_to_xyxy(box, in_fmt), out_fmt)


def order_corners(box: Sequence[float]) -> Box:
    """Return ``box`` (xyxy) with ``x1 <= x2`` and ``y1 <= y2``; models sometimes write the corners swapped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def clamp_box(box: Sequence[float], image_size: tuple[float, float]) -> Box:
    """Clamp an xyxy box to the image ``[0, W] x [0, H]`` (a box may end up with zero width or height)."""
    w, h = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def normalize_box(box: Sequence[float], image_size: tuple[float, float]) -> Box:
    """Pixel xyxy -> fractions of the image size (``x / W``, ``y / H``), not clamped."""
    w, h = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 / w, y1 / h, x2 / w, y2 / h)


def denormalize_box(box: Sequence[float], image_size: tuple[float, float]) -> Box:
    """Fractions of the image size -> pixel xyxy; the inverse of :func:`normalize_box`."""
    w, h = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * w, y1 * h, x2 * w, y2 * h)


def box_area(box: Sequence[float]) -> float:
    """Area of an xyxy box; zero (never negative) for degenerate or swapped boxes."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def enclosing_box(boxes: Sequence[Sequence[float]]) -> Box:
    """Smallest xyxy box containing every box (Flickr30k MERGED-BOXES protocol).

    Raises:
        ValueError: when ``boxes`` is empty, as there is nothing to enclose.
    """
    if len(boxes) == 0:
        raise ValueError("enclosing_box needs at least one box")
    ordered = [order_corners(b) for b in boxes]
    return (
        min(b[0] for b in ordered),
        min(b[1] for b in ordered),
        max(b[2] for b in ordered),
        max(b[3] for b in ordered),
    )


def square_pad_geometry(image_size: tuple[int, int]) -> tuple[int, int, int]:
    """Offsets and side of the square an image is pasted into by LLaVA's / Shikra's ``expand2square``.

    Both models paste the image centred on a ``max(W, H)`` square at ``((S - W) // 2, (S - H) // 2)``;
    coordinates they read and write are fractions of that square, not of the image.

    Returns:
        ``(dx, dy, side)``.
    """
    w, h = (int(v) for v in image_size)
    side = max(w, h)
    return (side - w) // 2, (side - h) // 2, side


def to_square_padded(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Pixel xyxy in the image -> fractions of the ``expand2square`` square (see :func:`square_pad_geometry`)."""
    dx, dy, side = square_pad_geometry(image_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return ((x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side)


def from_square_padded(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Fractions of the ``expand2square`` square -> pixel xyxy in the image; inverse of :func:`to_square_padded`."""
    dx, dy, side = square_pad_geometry(image_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * side - dx, y1 * side - dy, x2 * side - dx, y2 * side - dy)

"""Box geometry for region queries: coverage, aspect ratio, crop expansion and crop↔image maps.

All boxes are ``xyxy`` in pixels. Functions take a ``[N, 4]`` tensor or a sequence of 4-sequences; the map
functions return the same kind they were given, so callers holding plain lists (JSON records) need no torch.
Computation is float64 so that the property tests can compare against plain-Python references exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Box = tuple[float, float, float, float]
BoxesLike = torch.Tensor | Sequence[Sequence[float]]


def as_boxes(boxes: BoxesLike) -> torch.Tensor:
    """Return ``boxes`` as a CPU float64 ``[N, 4]`` tensor, raising ``ValueError`` on any other shape."""
    out = torch.as_tensor(boxes, dtype=torch.float64).detach().cpu()
    if out.numel() == 0:
        return out.reshape(0, 4)
    if out.ndim != 2 or out.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (xyxy), got {tuple(out.shape)}")
    return out


def as_box(box: torch.Tensor | Sequence[float]) -> Box:
    """Return one box as a tuple of four Python floats."""
    values = torch.as_tensor(box, dtype=torch.float64).flatten().tolist()
    if len(values) != 4:
        raise ValueError(f"a box has 4 values (x1, y1, x2, y2), got {len(values)}")
    return (values[0], values[1], values[2], values[3])


def inside_fraction(boxes: BoxesLike, region: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Fraction of each box's area that lies inside ``region``.

    SPR appendix: object indices "only consider objects with at least 50% of their area falling within the
    queried region", so this is the quantity thresholded at 0.5. A zero-area box has no fraction; it counts
    as 1.0 when it lies inside the region (closed box) and 0.0 otherwise.

    Returns:
        float64 tensor ``[N]`` in ``[0, 1]``.
    """
    b = as_boxes(boxes)
    r = as_box(region)
    iw = (torch.minimum(b[:, 2], torch.tensor(r[2])) - torch.maximum(b[:, 0], torch.tensor(r[0]))).clamp(min=0)
    ih = (torch.minimum(b[:, 3], torch.tensor(r[3])) - torch.maximum(b[:, 1], torch.tensor(r[1]))).clamp(min=0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    contained = (b[:, 0] >= r[0]) & (b[:, 1] >= r[1]) & (b[:, 2] <= r[2]) & (b[:, 3] <= r[3])
    safe_area = torch.where(area > 0, area, torch.ones_like(area))
    return torch.where(area > 0, iw * ih / safe_area, contained.to(torch.float64))


def aspect_ratio(box: torch.Tensor | Sequence[float]) -> float:
    """Short side over long side of one box, in ``[0, 1]``; 0 for a degenerate box.

    SPR appendix keeps regions with this ratio greater than 1/3 because "most MLLMs preprocess input images
    into square shapes, and regions with extreme aspect ratios are too challenging".
    """
    x1, y1, x2, y2 = as_box(box)
    w, h = x2 - x1, y2 - y1
    long_side = max(w, h)
    if long_side <= 0:
        return 0.0
    return max(min(w, h), 0.0) / long_side


def union_box(a: Sequence[float], b: Sequence[float]) -> Box:
    """Smallest box holding both boxes."""
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def expand_box(box: Sequence[float], scale: float, image_size: tuple[float, float]) -> Box:
    """Scale each side of ``box`` by ``scale`` about its centre, then clip it to the image.

    SPR appendix: "we slightly expand both sides of the region by 1.5 times before performing the crop", read
    here as width and height each multiplied by 1.5 (the box's area grows 2.25×) so that the crop shows
    context around the region.

    Args:
        box: ``xyxy`` pixels.
        scale: side-length factor (1.5 in SPR).
        image_size: ``(width, height)`` to clip to.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = image_size
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    return (
        max(0.0, cx - half_w),
        max(0.0, cy - half_h),
        min(float(width), cx + half_w),
        min(float(height), cy + half_h),
    )


def resize_scale(crop_box: Sequence[float], resized_size: tuple[float, float]) -> tuple[float, float]:
    """``(sx, sy)`` that maps crop pixels to pixels of the crop resized to ``resized_size`` (width, height)."""
    x1, y1, x2, y2 = (float(v) for v in crop_box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop box {list(crop_box)} has no area")
    return (resized_size[0] / (x2 - x1), resized_size[1] / (y2 - y1))


def _scale_vector(scale: float | tuple[float, float]) -> torch.Tensor:
    sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    if sx <= 0 or sy <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float64)


def _like_input(out: torch.Tensor, boxes: BoxesLike) -> BoxesLike:
    if isinstance(boxes, torch.Tensor):
        dtype = boxes.dtype if boxes.is_floating_point() else torch.float64
        return out.to(dtype=dtype, device=boxes.device)
    return out.tolist()


def image_to_crop(
    boxes: BoxesLike, crop_box: Sequence[float], scale: float | tuple[float, float] = 1.0, clip: bool = False
) -> BoxesLike:
    """Map image-pixel boxes into the frame of a crop (optionally resized by ``scale``).

    Args:
        boxes: ``[N, 4]`` image ``xyxy`` pixels.
        crop_box: the crop in image pixels.
        scale: crop-to-resized factor, one float or ``(sx, sy)`` (see :func:`resize_scale`); 1 for no resize.
        clip: clip the result to the crop frame. Clipping loses information, so only the unclipped map is
            the exact inverse of :func:`crop_to_image`.

    Returns:
        boxes of the same kind as ``boxes`` (tensor or nested list).
    """
    b = as_boxes(boxes)
    x1, y1, x2, y2 = (float(v) for v in crop_box)
    s = _scale_vector(scale)
    out = (b - torch.tensor([x1, y1, x1, y1], dtype=torch.float64)) * s
    if clip:
        limit = torch.tensor([x2 - x1, y2 - y1, x2 - x1, y2 - y1], dtype=torch.float64) * s
        out = torch.minimum(out.clamp(min=0), limit)
    return _like_input(out, boxes)


def crop_to_image(boxes: BoxesLike, crop_box: Sequence[float], scale: float | tuple[float, float] = 1.0) -> BoxesLike:
    """Map boxes predicted on a crop (optionally resized by ``scale``) back to image pixels.

    SPR appendix: "For region descriptions generated using the cropped images, we remap their generated
    grounding coordinates back to the original image coordinates before further processing and scoring."
    Exact inverse of :func:`image_to_crop` with ``clip=False`` (up to float rounding).
    """
    b = as_boxes(boxes)
    x1, y1 = float(crop_box[0]), float(crop_box[1])
    out = b / _scale_vector(scale) + torch.tensor([x1, y1, x1, y1], dtype=torch.float64)
    return _like_input(out, boxes)

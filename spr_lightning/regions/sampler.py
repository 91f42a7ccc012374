"""Random region growth of SPR §3.1 ("Region Query Construction") and appendix §1.

A region starts at a random object and grows by the nearest object outside it until more than four objects
are in; from then on each step stops at random. Regions whose short/long side ratio is not above 1/3 keep
growing; a seed that cannot reach a valid region is replaced by another seed, a bounded number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spr_lightning.regions.geometry import (
    Box,
    BoxesLike,
    as_box,
    as_boxes,
    aspect_ratio,
    expand_box,
    inside_fraction,
    union_box,
)


@dataclass(frozen=True)
class Region:
    """One queried region of an image.

    Attributes:
        box: the region, ``xyxy`` image pixels: the union box of the objects grown into it.
        crop_box: ``box`` with each side scaled by ``crop_scale`` (1.5 in SPR) about its centre, clipped to
            the image; what the crop-based prompts show the model.
        object_indices: sorted indices (into the boxes given to the sampler) of the objects with at least
            ``inside_fraction`` (50% in SPR) of their area inside ``box``: the region's object references.
        image_size: ``(width, height)`` of the image, so that a region is self-contained in a JSON record.
        seed_index: the object the growth started from (for debugging and analysis).
    """

    box: Box
    crop_box: Box
    object_indices: tuple[int, ...]
    image_size: tuple[float, float]
    seed_index: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, ints, floats)."""
        return {
            "box": list(self.box),
            "crop_box": list(self.crop_box),
            "object_indices": list(self.object_indices),
            "image_size": list(self.image_size),
            "seed_index": self.seed_index,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a missing key."""
        missing = [k for k in ("box", "crop_box", "object_indices", "image_size", "seed_index") if k not in data]
        if missing:
            raise ValueError(f"region record lacks keys {missing}")
        width, height = data["image_size"]
        return cls(
            box=as_box(data["box"]),
            crop_box=as_box(data["crop_box"]),
            object_indices=tuple(int(i) for i in data["object_indices"]),
            image_size=(width, height),
            seed_index=int(data["seed_index"]),
        )


class RegionSampler:
    """Sample SPR region queries from an image's object boxes.

    "Nearest" object: the object outside the region whose box centre is closest (Euclidean) to the region
    box, distance 0 when the centre is inside it; ties go to the centre closest to the region's centre, then
    to the lowest index. The appendix says "we iteratively include the closest objects located outside the
    current region"; measuring from the object's centre makes a large object that merely touches the region
    no closer than a small one next to it, so growth follows where objects are rather than how big they are.

    "In the region": an object with at least ``inside_fraction`` of its area inside the region box. Objects
    covered by growth count as in without having been picked, so one step can bring in several objects.

    Args:
        min_objects_in_region: growth may stop only once *more than* this many objects are in (4 in SPR).
        stop_prob: probability of stopping at each step once stopping is allowed (the paper's "stops
            randomly"; 0.5 gives a geometric number of extra steps with mean 1).
        max_aspect_tries: how many seed objects to try before giving up on an image. A seed fails when its
            region runs out of objects (or passes ``max_objects``) before the aspect rule holds. Without
            ``max_objects`` a failing seed has grown to the union of all objects, which every other seed would
            reach too, so the sampler gives up at once; retries matter only with a cap.
        min_aspect: the region's short/long side ratio must be greater than this (1/3 in SPR).
        crop_scale: side-length factor of the crop box about the region (1.5 in SPR).
        inside_fraction: area fraction that makes an object part of the region (0.5 in SPR).
        max_objects: optional hard cap on the objects in a region: growth stops when it reaches the cap
            with a valid region, and the seed fails when the cap is passed (one step can cover several
            objects) or reached with a bad aspect ratio. ``None`` (the paper) lets the region grow.
    """

    def __init__(
        self,
        min_objects_in_region: int = 4,
        stop_prob: float = 0.5,
        max_aspect_tries: int = 10,
        min_aspect: float = 1 / 3,
        crop_scale: float = 1.5,
        inside_fraction: float = 0.5,
        max_objects: int | None = None,
    ) -> None:
        if not 0.0 <= stop_prob <= 1.0:
            raise ValueError(f"stop_prob must be in [0, 1], got {stop_prob}")
        if max_aspect_tries < 1:
            raise ValueError(f"max_aspect_tries must be >= 1, got {max_aspect_tries}")
        if not 0.0 < inside_fraction <= 1.0:
            raise ValueError(f"inside_fraction must be in (0, 1], got {inside_fraction}")
        if crop_scale < 1.0:
            raise ValueError(f"crop_scale must be >= 1 (the crop holds the region), got {crop_scale}")
        if max_objects is not None and max_objects <= min_objects_in_region:
            raise ValueError(f"max_objects ({max_objects}) must exceed min_objects_in_region")
        self.min_objects_in_region = min_objects_in_region
        self.stop_prob = stop_prob
        self.max_aspect_tries = max_aspect_tries
        self.min_aspect = min_aspect
        self.crop_scale = crop_scale
        self.inside_fraction = inside_fraction
        self.max_objects = max_objects

    def sample(self, boxes: BoxesLike, image_size: tuple[float, float], generator: torch.Generator) -> Region | None:
        """Grow one region; ``None`` when no tried seed gives a valid region (or too few objects).

        Args:
            boxes: ``[N, 4]`` object boxes, ``xyxy`` pixels inside the image (already filtered).
            image_size: ``(width, height)``.
            generator: CPU ``torch.Generator``; the same seed gives the same region.
        """
        b = as_boxes(boxes)
        n = b.shape[0]
        if n <= self.min_objects_in_region:
            return None
        for seed in torch.randperm(n, generator=generator)[: self.max_aspect_tries].tolist():
            box = self._grow(b, seed, generator)
            if box is not None:
                return self._region(b, box, seed, image_size)
            if self.max_objects is None:
                return None
        return None

    def _valid(self, n_in: int, box: Box) -> bool:
        capped = self.max_objects is None or n_in <= self.max_objects
        return capped and n_in > self.min_objects_in_region and aspect_ratio(box) > self.min_aspect

    def _grow(self, boxes: torch.Tensor, seed: int, generator: torch.Generator) -> Box | None:
        """Grow from ``seed`` until a random stop on a valid region; ``None`` if objects (or the cap) run out."""
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        region = as_box(boxes[seed])
        while True:
            inside = inside_fraction(boxes, region) >= self.inside_fraction
            n_in = int(inside.sum())
            valid = self._valid(n_in, region)
            if self.max_objects is not None and n_in >= self.max_objects:
                return region if valid else None  # growing only adds objects: the cap allows no next step
            if valid:
                if float(torch.rand((), generator=generator, dtype=torch.float64)) < self.stop_prob:
                    return region
            outside = (~inside).nonzero().flatten()
            if outside.numel() == 0:
                return region if valid else None
            nearest = int(outside[_nearest(centres[outside], region)])
            region = union_box(region, as_box(boxes[nearest]))

    def _region(self, boxes: torch.Tensor, box: Box, seed: int, image_size: tuple[float, float]) -> Region:
        inside = inside_fraction(boxes, box) >= self.inside_fraction
        return Region(
            box=box,
            crop_box=expand_box(box, self.crop_scale, image_size),
            object_indices=tuple(inside.nonzero().flatten().tolist()),
            image_size=(image_size[0], image_size[1]),
            seed_index=seed,
        )


def _nearest(centres: torch.Tensor, region: Sequence[float]) -> int:
    """Index of the centre nearest to the region box, ties to the region's centre, then the lowest index."""
    x1, y1, x2, y2 = region
    dx = torch.maximum(torch.maximum(x1 - centres[:, 0], centres[:, 0] - x2), torch.zeros(()))
    dy = torch.maximum(torch.maximum(y1 - centres[:, 1], centres[:, 1] - y2), torch.zeros(()))
    to_box = dx * dx + dy * dy
    ties = (to_box == to_box.min()).nonzero().flatten()
    if ties.numel() == 1:
        return int(ties[0])
    c = centres[ties]
    to_centre = (c[:, 0] - (x1 + x2) / 2) ** 2 + (c[:, 1] - (y1 + y2) / 2) ** 2
    return int(ties[int(torch.argmin(to_centre))])

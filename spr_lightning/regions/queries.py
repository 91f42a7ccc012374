"""Region queries: one sampled region of one image rendered with one prompt template, as JSON-able records.

:func:`make_queries` seeds a fresh generator per ``(seed, image_id, k)``, so a query depends on nothing but
those three values: a resumed or sharded run regenerates exactly the same queries, and can skip the ones it
already wrote by ``query_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spr_lightning.regions.annotations import AnnotationIndex
from spr_lightning.regions.geometry import Box
from spr_lightning.regions.prompts import (
    BoxEncoder,
    PromptTemplate,
    RegionObject,
    encode_box_pixels,
    render_prompt,
)
from spr_lightning.regions.sampler import Region, RegionSampler

SCHEMA_VERSION = 1
_KEYS = (
    "query_id",
    "region_id",
    "image_id",
    "file_name",
    "image_size",
    "region",
    "objects",
    "prompt",
    "template_name",
    "uses_crop",
)


@dataclass(frozen=True)
class RegionQuery:
    """A region-description query, as written into WebDataset shard JSON.

    Attributes:
        query_id: ``f"{image_id}-{k}-{template_name}"``: unique and stable across runs.
        region_id: ``f"{image_id}-{k}"``: shared by the queries that render one region with different templates,
            so that their candidates can be ranked together.
        image_id, file_name, image_size: the source image (``(width, height)`` pixels).
        region: the sampled region (box, crop box, object indices).
        objects: the region's objects (image ``xyxy`` pixels, labels), in ``region.object_indices`` order.
        prompt: the rendered prompt text.
        template_name: the template that rendered it.
        uses_crop: the model must be shown ``region.crop_box`` of the image, and its boxes are crop coordinates.
    """

    query_id: str
    region_id: str
    image_id: int
    file_name: str
    image_size: tuple[int, int]
    region: Region
    objects: tuple[RegionObject, ...]
    prompt: str
    template_name: str
    uses_crop: bool

    @property
    def frame_box(self) -> Box:
        """The image the model sees, in image pixels: boxes in its answer map back with ``crop_to_image``."""
        if self.uses_crop:
            return self.region.crop_box
        return (0.0, 0.0, float(self.image_size[0]), float(self.image_size[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (only lists, str, int, float, bool), tagged with ``schema``."""
        return {
            "schema": SCHEMA_VERSION,
            "query_id": self.query_id,
            "region_id": self.region_id,
            "image_id": self.image_id,
            "file_name": self.file_name,
            "image_size": list(self.image_size),
            "region": self.region.to_dict(),
            "objects": [o.to_dict() for o in self.objects],
            "prompt": self.prompt,
            "template_name": self.template_name,
            "uses_crop": self.uses_crop,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionQuery:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming the query and what is wrong."""
        qid = data.get("query_id", "<no query_id>")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"region query {qid}: schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise ValueError(f"region query {qid}: missing keys {missing}")
        width, height = data["image_size"]
        return cls(
            query_id=str(data["query_id"]),
            region_id=str(data["region_id"]),
            image_id=int(data["image_id"]),
            file_name=str(data["file_name"]),
            image_size=(int(width), int(height)),
            region=Region.from_dict(data["region"]),
            objects=tuple(RegionObject.from_dict(o) for o in data["objects"]),
            prompt=str(data["prompt"]),
            template_name=str(data["template_name"]),
            uses_crop=bool(data["uses_crop"]),
        )


def query_seed(seed: int, image_id: int, k: int) -> int:
    """A 63-bit generator seed from ``(seed, image_id, k)``, stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{image_id}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _template_list(templates: Sequence[PromptTemplate] | Mapping[str, PromptTemplate]) -> list[PromptTemplate]:
    out = list(templates.values()) if isinstance(templates, Mapping) else list(templates)
    if not out:
        raise ValueError("make_queries needs at least one template")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"template names must be unique (they are part of query ids), got {names}")
    return out


def make_queries(
    index: AnnotationIndex,
    sampler: RegionSampler,
    templates: Sequence[PromptTemplate] | Mapping[str, PromptTemplate],
    queries_per_image: int,
    seed: int,
    encode_box: BoxEncoder = encode_box_pixels,
    templates_per_region: int | None = None,
    skip: Collection[str] = (),
) -> Iterator[RegionQuery]:
    """Sample ``queries_per_image`` regions per image and render each with the templates, lazily.

    Images come in index order; give an already-filtered index (:func:`filter_annotations`). An image where the
    sampler finds no valid region yields nothing for that ``k``.

    Args:
        index: images and objects.
        sampler: the region sampler.
        templates: prompt variants (a sequence, or a name -> template mapping such as ``DEFAULT_TEMPLATES``).
        queries_per_image: regions sampled per image (``k = 0 .. queries_per_image - 1``).
        seed: run seed; with ``image_id`` and ``k`` it fixes the region and the templates chosen.
        encode_box: coordinate codec of the target model, ``(box, frame_size) -> str``.
        templates_per_region: render each region with this many templates drawn at random without
            replacement; ``None`` renders it with every template (the paper prompts one region several ways).
        skip: ``query_id`` s already written (resume): not yielded, while the rest stay identical.
    """
    chosen = _template_list(templates)
    if templates_per_region is not None and not 1 <= templates_per_region <= len(chosen):
        raise ValueError(f"templates_per_region must be in [1, {len(chosen)}], got {templates_per_region}")
    for image_id, info in index.images.items():
        objects = index.objects(image_id)
        for k in range(queries_per_image):
            generator = torch.Generator().manual_seed(query_seed(seed, image_id, k))
            region = sampler.sample(objects.boxes, (info.width, info.height), generator)
            if region is None:
                continue
            picked = chosen
            if templates_per_region is not None:
                order = torch.randperm(len(chosen), generator=generator)[:templates_per_region]
                picked = [chosen[i] for i in sorted(order.tolist())]
            refs = tuple(RegionObject((*objects.boxes[i].tolist(),), objects.labels[i]) for i in region.object_indices)
            for template in picked:
                query_id = f"{image_id}-{k}-{template.name}"
                if query_id in skip:
                    continue
                rendered = render_prompt(template, region, refs, encode_box)
                yield RegionQuery(
                    query_id=query_id,
                    region_id=f"{image_id}-{k}",
                    image_id=image_id,
                    file_name=info.file_name,
                    image_size=(info.width, info.height),
                    region=region,
                    objects=refs,
                    prompt=rendered.text,
                    template_name=rendered.template_name,
                    uses_crop=rendered.uses_crop,
                )

"""Region queries of SPR §3.1 and appendix §1: pure functions and dataclasses, no Lightning or transformers.

- :mod:`~spr_lightning.regions.annotations`: read COCO/LVIS/Objects365 JSON once into an index; filter it.
- :mod:`~spr_lightning.regions.geometry`: coverage, aspect ratio, crop expansion, crop↔image maps.
- :mod:`~spr_lightning.regions.sampler`: :class:`RegionSampler` grows random regions; :class:`Region`.
- :mod:`~spr_lightning.regions.prompts`: prompt templates and :func:`render_prompt`.
- :mod:`~spr_lightning.regions.queries`: :class:`RegionQuery` records and :func:`make_queries`.

See ``docs/regions.md`` for the rules and the choices made where the paper is silent.
"""

from spr_lightning.regions.annotations import (
    AnnotationIndex,
    ImageInfo,
    ImageObjects,
    filter_annotations,
    load_annotations,
    normalize_label,
)
from spr_lightning.regions.geometry import (
    aspect_ratio,
    crop_to_image,
    expand_box,
    image_to_crop,
    inside_fraction,
    resize_scale,
)
from spr_lightning.regions.prompts import (
    DEFAULT_TEMPLATES,
    BoxEncoder,
    PromptTemplate,
    RegionObject,
    RenderedPrompt,
    encode_box_pixels,
    render_prompt,
)
from spr_lightning.regions.queries import RegionQuery, make_queries, query_seed
from spr_lightning.regions.sampler import Region, RegionSampler

__all__ = [
    "DEFAULT_TEMPLATES",
    "AnnotationIndex",
    "BoxEncoder",
    "ImageInfo",
    "ImageObjects",
    "PromptTemplate",
    "Region",
    "RegionObject",
    "RegionQuery",
    "RegionSampler",
    "RenderedPrompt",
    "aspect_ratio",
    "crop_to_image",
    "encode_box_pixels",
    "expand_box",
    "filter_annotations",
    "image_to_crop",
    "inside_fraction",
    "load_annotations",
    "make_queries",
    "normalize_label",
    "query_seed",
    "render_prompt",
    "resize_scale",
]

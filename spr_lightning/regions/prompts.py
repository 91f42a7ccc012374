"""Prompt templates for region descriptions (SPR §3.1 "Grounded Region Description Generation", Fig. 2).

SPR builds several prompts per region to diversify candidate descriptions: the region box on the full image,
the cropped region image, and object references from the annotations. A template says which of these it
uses; :func:`render_prompt` writes every box through an injected ``encode_box`` callable, so the coordinate
format (0-999 bins, 0-1 floats, pixels, ...) belongs to the codec and not to this module.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from spr_lightning.regions.geometry import Box, as_box, image_to_crop
from spr_lightning.regions.sampler import Region

BoxEncoder = Callable[[Box, tuple[float, float]], str]
"""``encode_box(box, frame_size) -> str``: a box in ``xyxy`` pixels of the image the model sees (the full
image, or the crop), and that image's ``(width, height)``, which normalised formats need."""

PLACEHOLDERS = frozenset({"region", "objects"})


def encode_box_pixels(box: Box, frame_size: tuple[float, float]) -> str:
    """Plain pixel codec ``[x1, y1, x2, y2]`` (rounded integers): the default when no model codec is given."""
    del frame_size  # absolute pixels need no normalisation
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


@dataclass(frozen=True)
class RegionObject:
    """An annotated object of a region: ``box`` in image ``xyxy`` pixels and its label."""

    box: Box
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "label": self.label}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionObject:
        return cls(box=as_box(data["box"]), label=str(data["label"]))


@dataclass(frozen=True)
class PromptTemplate:
    """A region prompt variant.

    Attributes:
        name: unique key, recorded with every rendered prompt (and in query ids).
        text: ``str.format`` text; ``{region}`` is the encoded region box, ``{objects}`` the object references.
        uses_crop: the model sees the crop (``region.crop_box``) instead of the full image, and every box in
            the prompt is in crop coordinates; answers must be mapped back with ``crop_to_image``.
        uses_objects: the prompt lists the region's annotated objects (needs ``{objects}`` in ``text``).
        object_format: how one object reference reads; ``{label}`` and ``{box}``.
        object_separator: joins object references.
    """

    name: str
    text: str
    uses_crop: bool = False
    uses_objects: bool = False
    object_format: str = "{label} {box}"
    object_separator: str = ", "

    def __post_init__(self) -> None:
        fields = {f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None}
        if fields - PLACEHOLDERS:
            raise ValueError(f"template {self.name!r}: unknown placeholders {sorted(fields - PLACEHOLDERS)}")
        if ("objects" in fields) != self.uses_objects:
            raise ValueError(
                f"template {self.name!r}: uses_objects={self.uses_objects} but '{{objects}}' is "
                f"{'present' if 'objects' in fields else 'absent'} in its text"
            )
        object_fields = {f for _, f, _, _ in string.Formatter().parse(self.object_format) if f is not None}
        if not object_fields <= {"label", "box"}:
            raise ValueError(f"template {self.name!r}: object_format may use only {{label}} and {{box}}")


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready for the model.

    Attributes:
        text: the prompt.
        template_name: which :class:`PromptTemplate` made it.
        uses_crop: whether the model must be shown the crop instead of the full image.
        frame_box: the image the model sees, in image pixels (``crop_box`` or the whole image); boxes in
            ``text`` and in the model's answer are relative to it (``crop_to_image(boxes, frame_box)``).
    """

    text: str
    template_name: str
    uses_crop: bool
    frame_box: Box


_COMMON = "Mention every object you describe together with its bounding box."

DEFAULT_TEMPLATES: Mapping[str, PromptTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            PromptTemplate("region", "Describe the region {region} of the image in detail. " + _COMMON),
            PromptTemplate(
                "region_objects",
                "Describe the region {region} of the image in detail. Objects in this region: {objects}. " + _COMMON,
                uses_objects=True,
            ),
            PromptTemplate(
                "crop",
                "This image is a close-up around the region {region}. Describe that region in detail. " + _COMMON,
                uses_crop=True,
            ),
            PromptTemplate(
                "crop_objects",
                "This image is a close-up around the region {region}. Objects in this region: {objects}. "
                "Describe that region in detail. " + _COMMON,
                uses_crop=True,
                uses_objects=True,
            ),
            PromptTemplate(
                "region_scene",
                "What can be seen in the area {region}? Give a detailed description of the objects there, their "
                "appearance and how they relate to each other. " + _COMMON,
            ),
        )
    }
)
"""The default prompt variants (SPR Fig. 2: region box on the full image, cropped region, object references,
and their combinations). The paper does not print its prompt wording; these texts are this project's."""


def _clip_to_frame(box: Box, size: tuple[float, float]) -> Box:
    return (
        min(max(box[0], 0.0), size[0]),
        min(max(box[1], 0.0), size[1]),
        min(max(box[2], 0.0), size[0]),
        min(max(box[3], 0.0), size[1]),
    )


def render_prompt(
    template: PromptTemplate,
    region: Region,
    objects: Sequence[RegionObject | tuple[Sequence[float], str]],
    encode_box: BoxEncoder = encode_box_pixels,
) -> RenderedPrompt:
    """Fill ``template`` for ``region``.

    Boxes are given to ``encode_box`` in the frame the model sees: crop coordinates when the template uses
    the crop, image coordinates otherwise; object boxes are clipped to that frame first, because an object
    only half inside the region can reach past the crop and codecs expect in-frame boxes.

    Args:
        template: the variant.
        region: from :class:`RegionSampler`.
        objects: the region's objects, image ``xyxy`` pixels and labels (ignored unless ``uses_objects``).
        encode_box: ``(box, frame_size) -> str`` codec of the target model.
    """
    width, height = region.image_size
    frame: Box = region.crop_box if template.uses_crop else (0.0, 0.0, float(width), float(height))
    size = (frame[2] - frame[0], frame[3] - frame[1])

    def encode(box: Sequence[float]) -> str:
        local = as_box(image_to_crop([list(box)], frame)[0])
        return encode_box(_clip_to_frame(local, size), size)

    values = {"region": encode(region.box)}
    if template.uses_objects:
        refs = [o if isinstance(o, RegionObject) else RegionObject(as_box(o[0]), str(o[1])) for o in objects]
        values["objects"] = template.object_separator.join(
            template.object_format.format(label=o.label, box=encode(o.box)) for o in refs
        )
    return RenderedPrompt(template.text.format(**values), template.name, template.uses_crop, frame)

"""Grounded question/answer samples that teach a tiny model to see before SPR improves it.

Each sample is ``{"prompt", "answer"}`` about one image, the answer's boxes written with a coordinate codec
(``spr_lightning.coords``). The prompts are the ones the later stages ask, so SFT teaches exactly the formats
that generation, scoring and evaluation read back:

* ``rec``: the evaluator's REC question (``"Give the bounding box of the small red triangle."``)
  answered with one box;
* ``phrase``: the evaluator's phrase-grounding question (Ferret's ``"What are the locations of ...?"``)
  answered with the caption, each phrase followed by its boxes;
* ``region``: SPR's region prompt (``DEFAULT_TEMPLATES["region"]``, a region grown by the SPR
  :class:`~spr_lightning.regions.RegionSampler`) answered with every object in the region and its box;
* ``image``: a full-image description listing every object with its box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spr_lightning.coords import Codec
from spr_lightning.regions.prompts import DEFAULT_TEMPLATES
from spr_lightning.regions.sampler import RegionSampler
from spr_lightning.shapes.captions import Caption, ground_caption, listing_caption
from spr_lightning.shapes.referring import ReferringExpression
from spr_lightning.shapes.scene import Scene

__all__ = ["IMAGE_PROMPT", "PHRASE_PROMPT", "REC_PROMPT", "SFTSample", "join_phrases", "sft_samples"]

#: The evaluator's default prompts (``spr_lightning.evaluation.DEFAULT_PROMPTS``, equal by test); repeated here
#: so that writing a world does not import Lightning and transformers.
REC_PROMPT = "Give the bounding box of {expression}."
PHRASE_PROMPT = "What are the locations of {phrases}?"
IMAGE_PROMPT = "Describe the image in detail. Mention every object you describe together with its bounding box."


@dataclass(frozen=True)
class SFTSample:
    """One grounded Q/A: ``task`` (``rec``, ``phrase``, ``region``, ``image``), the texts, the pixel ``xyxy``
    boxes written in ``answer`` in the order ``codec.decode`` reads them, and for ``region`` samples the
    region's pixel box (``None``: the question is about the full image)."""

    task: str
    prompt: str
    answer: str
    boxes: tuple[tuple[float, float, float, float], ...]
    region: tuple[float, float, float, float] | None = None


def join_phrases(phrases: Sequence[str]) -> str:
    """Phrases as the evaluator puts them in the question: lower case, commas removed, joined by ``", "``."""
    return ", ".join(p.replace(",", "").strip().lower() for p in phrases)


def _boxes(boxes: Sequence[Sequence[float]]) -> tuple[tuple[float, float, float, float], ...]:
    return tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes)


def _rec_samples(scene: Scene, expressions: dict[int, list[ReferringExpression]], codec: Codec,
                 rng: np.random.Generator, count: int) -> list[SFTSample]:
    targets = sorted(expressions)
    out = []
    for target in [targets[i] for i in sorted(rng.permutation(len(targets))[:count].tolist())]:
        options = expressions[target]
        expression = options[int(rng.integers(len(options)))]
        box = scene.objects[target].box
        out.append(SFTSample("rec", REC_PROMPT.format(expression=expression.text),
                             codec.encode(list(box), scene.size), _boxes([box])))
    return out


def _described(task: str, prompt: str, caption: Caption, scene: Scene, codec: Codec,
               region: Sequence[float] | None = None) -> SFTSample:
    answer, boxes = ground_caption(caption, scene.objects, codec, scene.size)
    return SFTSample(task, prompt, answer, _boxes(boxes), None if region is None else _boxes([region])[0])


def _region_samples(scene: Scene, codec: Codec, seed: int, count: int) -> list[SFTSample]:
    sampler = RegionSampler()  # SPR's defaults: more than four objects, aspect > 1/3
    generator = torch.Generator().manual_seed(seed)
    boxes = [list(o.box) for o in scene.objects]
    out = []
    for _ in range(count):
        region = sampler.sample(boxes, scene.size, generator)
        if region is None:
            continue
        prompt = DEFAULT_TEMPLATES["region"].text.format(region=codec.encode(list(region.box), scene.size))
        caption = listing_caption(scene.objects, region.object_indices)
        out.append(_described("region", prompt, caption, scene, codec, region.box))
    return out


def sft_samples(
    scene: Scene,
    expressions: dict[int, list[ReferringExpression]],
    captions: Sequence[Caption],
    codec: Codec,
    rng: np.random.Generator,
    rec_per_image: int = 3,
    regions_per_image: int = 1,
) -> list[SFTSample]:
    """The SFT samples of one image: ``rec_per_image`` REC questions (distinct targets, one random sentence
    each), one phrase-grounding question per caption, ``regions_per_image`` region descriptions and one
    full-image description.

    Args:
        scene: the image's scene.
        expressions: from :func:`~spr_lightning.shapes.referring.referring_expressions`.
        captions: phrase-grounding captions of the image (:func:`~spr_lightning.shapes.captions.make_caption`).
        codec: writes the answer boxes.
        rng: picks targets, sentences and the region seed.
        rec_per_image: REC questions per image (fewer when fewer objects can be referred to).
        regions_per_image: region descriptions per image.
    """
    samples = _rec_samples(scene, expressions, codec, rng, rec_per_image)
    for caption in captions:
        prompt = PHRASE_PROMPT.format(phrases=join_phrases(caption.phrases))
        samples.append(_described("phrase", prompt, caption, scene, codec))
    samples += _region_samples(scene, codec, int(rng.integers(2**62)), regions_per_image)
    everything = listing_caption(scene.objects, range(len(scene.objects)))
    samples.append(_described("image", IMAGE_PROMPT, everything, scene, codec))
    return samples

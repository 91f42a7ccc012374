"""Write an SPR-Shapes world to disk in the layouts the project's readers use.

``write_world(out_dir, {"train": 800, "val": 100, "test": 100})`` writes::

    out_dir/
      world.json                              what was written, with which settings, and counts
      images/{train,val,test}/000001.jpg      the images (file names are relative to images/ everywhere)
      annotations/instances_{split}.json      COCO detection (load_annotations, RegionQueryDataModule)
      annotations/refcoco_shapes.json         REC, RefCOCO layout, all splits in one file (RefCOCODataModule)
      annotations/flickr_{split}.json         phrase grounding, MDETR Flickr30k layout (Flickr30kEntitiesDataModule)
      sft_{split}.jsonl                       grounded Q/A for SFT; "image" is relative to out_dir

Every image is a pure function of ``(seed, split, index)``: its scene and its texts come from their own
random streams, so images do not depend on how many others are written, on their order, or on ``workers``,
and the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spr_lightning.coords import get_codec
from spr_lightning.shapes.captions import Caption, make_caption
from spr_lightning.shapes.referring import ReferringExpression, referring_expressions
from spr_lightning.shapes.render import render_scene
from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES, Scene, SceneConfig, make_scene
from spr_lightning.shapes.sft import SFTSample, sft_samples

__all__ = [
    "SPLITS",
    "ImageRecord",
    "WorldPaths",
    "build_image",
    "categories",
    "coco_detection",
    "flickr_entities",
    "refcoco_refs",
    "sft_lines",
    "write_world",
]

#: Splits a world can have, and their code in the per-image random streams (fixed: never reorder).
SPLITS = {"train": 0, "val": 1, "test": 2}
FORMAT_VERSION = 1
_MAX_OBJECTS = 100  # annotation id = image_id * _MAX_OBJECTS + object index


def categories() -> list[dict[str, Any]]:
    """COCO categories: one per ``size colour shape`` label, ids from 1 in a fixed order."""
    names = [f"{s} {c} {h}" for s in SIZES for c in COLORS for h in SHAPES]
    return [{"id": i + 1, "name": name, "supercategory": name.split()[-1]} for i, name in enumerate(names)]


_CATEGORY_IDS = {c["name"]: c["id"] for c in categories()}


@dataclass(frozen=True)
class WorldPaths:
    """Where :func:`write_world` put everything (absolute paths).

    Attributes:
        root: the world folder.
        image_root: ``root/images``: every ``file_name`` (COCO, REC, Flickr) is relative to it.
        detection: ``{split: annotations/instances_<split>.json}``.
        refcoco: ``annotations/refcoco_shapes.json`` (splits in its ``split`` field).
        flickr: ``{split: annotations/flickr_<split>.json}``.
        sft: ``{split: sft_<split>.jsonl}``; each line's ``image`` is relative to ``root``.
        manifest: ``world.json``.
    """

    root: Path
    image_root: Path
    detection: dict[str, Path] = field(default_factory=dict)
    refcoco: Path | None = None
    flickr: dict[str, Path] = field(default_factory=dict)
    sft: dict[str, Path] = field(default_factory=dict)
    manifest: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Paths relative to ``root`` (what ``world.json`` records)."""
        def rel(p: Path | None) -> str | None:
            return None if p is None else p.relative_to(self.root).as_posix()

        return {"image_root": rel(self.image_root), "detection": {k: rel(v) for k, v in self.detection.items()},
                "refcoco": rel(self.refcoco), "flickr": {k: rel(v) for k, v in self.flickr.items()},
                "sft": {k: rel(v) for k, v in self.sft.items()}}


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    image_id: int
    seed: int
    root: str
    config: SceneConfig
    coord_format: str
    jpeg_quality: int
    captions_per_image: int
    rec_per_image: int
    regions_per_image: int


@dataclass(frozen=True)
class ImageRecord:
    """One written image and everything said about it (what the annotation writers serialise)."""

    image_id: int
    split: str
    file_name: str
    scene: Scene
    expressions: dict[int, list[ReferringExpression]]
    captions: list[Caption]
    sft: list[SFTSample]


def build_image(job: _Job) -> ImageRecord:
    """Make, draw and save one image, and write its texts (runs in a worker when ``workers > 0``)."""
    code = SPLITS[job.split]
    scene = make_scene(np.random.default_rng([job.seed, code, job.index, 0]), job.config)
    file_name = f"{job.split}/{job.image_id:06d}.jpg"
    render_scene(scene).save(Path(job.root) / "images" / file_name, format="JPEG", quality=job.jpeg_quality)
    rng = np.random.default_rng([job.seed, code, job.index, 1])
    expressions = referring_expressions(scene.objects, scene.size, rng)
    captions = [make_caption(scene.objects, scene.background.kind, rng) for _ in range(job.captions_per_image)]
    sft = sft_samples(scene, expressions, captions, get_codec(job.coord_format), rng, job.rec_per_image,
                      job.regions_per_image)
    return ImageRecord(job.image_id, job.split, file_name, scene, expressions, captions, sft)


# -------------------------------------------------------------------------------------------- serialisers
def _xywh(box: tuple[int, int, int, int]) -> list[int]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _image_entry(record: ImageRecord) -> dict[str, Any]:
    return {"id": record.image_id, "file_name": record.file_name, "width": record.scene.width,
            "height": record.scene.height, "background": record.scene.background.kind}


def coco_detection(records: list[ImageRecord]) -> dict[str, Any]:
    """COCO instances file; each annotation also carries its ``attributes`` and ``visible_fraction``. ``area`` is
    the full box area (no masks here; the project's filters use box areas anyway)."""
    annotations = []
    for record in records:
        for k, obj in enumerate(record.scene.objects):
            annotations.append({
                "id": record.image_id * _MAX_OBJECTS + k, "image_id": record.image_id,
                "category_id": _CATEGORY_IDS[obj.label], "bbox": _xywh(obj.box), "area": obj.box_area, "iscrowd": 0,
                "attributes": {"size": obj.size, "color": obj.color, "shape": obj.shape},
                "visible_fraction": obj.visible_fraction,
            })
    return {"info": {"description": "SPR-Shapes synthetic world", "version": FORMAT_VERSION},
            "images": [_image_entry(r) for r in records], "annotations": annotations, "categories": categories()}


def refcoco_refs(records: list[ImageRecord]) -> list[dict[str, Any]]:
    """RefCOCO-layout refs, one per referred object; ``kinds`` says which sentences are relational."""
    refs = []
    for record in records:
        scene = record.scene
        for target, expressions in sorted(record.expressions.items()):
            refs.append({
                "id": len(refs) + 1, "image_id": record.image_id, "ann_id": record.image_id * _MAX_OBJECTS + target,
                "file_name": record.file_name, "sents": [e.text for e in expressions],
                "kinds": [e.kind for e in expressions], "bbox": _xywh(scene.objects[target].box),
                "category_id": _CATEGORY_IDS[scene.objects[target].label], "split": record.split,
                "height": scene.height, "width": scene.width,
            })
    return refs


def flickr_entities(records: list[ImageRecord]) -> dict[str, Any]:
    """MDETR Flickr30k Entities layout: one ``images`` entry per (image, caption), one annotation per box."""
    images, annotations = [], []
    for record in records:
        for sentence_id, caption in enumerate(record.captions):
            entry_id = len(images) + 1
            images.append({**_image_entry(record), "id": entry_id, "caption": caption.text, "dataset_name": "flickr",
                           "original_img_id": record.image_id, "sentence_id": sentence_id,
                           "tokens_positive_eval": [[list(span)] for span in caption.spans]})
            for phrase_id, (span, group) in enumerate(zip(caption.spans, caption.groups)):
                for k in group:
                    obj = record.scene.objects[k]
                    annotations.append({"id": len(annotations) + 1, "image_id": entry_id, "category_id": 1,
                                        "bbox": _xywh(obj.box), "area": obj.box_area, "iscrowd": 0,
                                        "tokens_positive": [list(span)], "phrase_ids": phrase_id})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def sft_lines(records: list[ImageRecord]) -> Iterator[str]:
    """JSONL lines ``{"id", "image", "image_size", "task", "region", "prompt", "answer", "boxes"}``."""
    for record in records:
        for j, sample in enumerate(record.sft):
            yield json.dumps({"id": f"{record.image_id:06d}-{j}", "image": f"images/{record.file_name}",
                              "image_size": list(record.scene.size), "task": sample.task,
                              "region": None if sample.region is None else list(sample.region), "prompt": sample.prompt,
                              "answer": sample.answer, "boxes": [list(b) for b in sample.boxes]})


# ------------------------------------------------------------------------------------------------ driver
def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _build_all(jobs: list[_Job], workers: int) -> list[ImageRecord]:
    if workers <= 0:
        return [build_image(job) for job in jobs]
    # spawn: safe with torch and threads in the parent; images are independent, so order is all imap keeps.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap(build_image, jobs, chunksize=16))


def write_world(
    out_dir: str | os.PathLike[str],
    num_images: Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] = 224,
    coord_format: str = "ferret",
    *,
    workers: int = 0,
    captions_per_image: int = 2,
    rec_per_image: int = 3,
    regions_per_image: int = 1,
    jpeg_quality: int = 90,
    scene_config: SceneConfig | None = None,
) -> WorldPaths:
    """Generate a world: images, COCO detection, REC, phrase grounding and SFT files (see the module docstring).

    Args:
        out_dir: folder to write into (created; files of an earlier world there are overwritten).
        num_images: images per split, keys among ``train``, ``val``, ``test`` (default 200/50/50); a split with
            0 images is not written.
        seed: the world's seed.
        image_size: ``W`` or ``(W, H)`` (ignored when ``scene_config`` is given).
        coord_format: codec of the SFT answers (``spr_lightning.coords``), e.g. ``"ferret"``, ``"qwen2_5_vl"``.
        workers: processes drawing images (0: in this process; results are identical either way).
        captions_per_image: phrase-grounding captions per image (Flickr entries and SFT ``phrase`` samples).
        rec_per_image: SFT ``rec`` samples per image (the REC file holds every referable object).
        regions_per_image: SFT ``region`` samples per image.
        jpeg_quality: JPEG quality of the images.
        scene_config: full scene settings (sizes, object counts, occlusion); default ``SceneConfig(image_size)``.

    Returns:
        The :class:`WorldPaths` of everything written.
    """
    counts = dict(num_images) if num_images is not None else {"train": 200, "val": 50, "test": 50}
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; a world has {list(SPLITS)}")
    get_codec(coord_format)  # fail before drawing anything
    config = scene_config or SceneConfig(image_size=image_size)
    if config.max_objects >= _MAX_OBJECTS:
        raise ValueError(f"at most {_MAX_OBJECTS - 1} objects per image (annotation ids), got {config.max_objects}")
    root = Path(out_dir).resolve()
    splits = [s for s in SPLITS if counts.get(s, 0) > 0]
    jobs, next_id = [], 1
    for split in splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for index in range(counts[split]):
            jobs.append(_Job(split, index, next_id, seed, str(root), config, coord_format, jpeg_quality,
                             captions_per_image, rec_per_image, regions_per_image))
            next_id += 1
    records = _build_all(jobs, workers)
    annotations = root / "annotations"
    paths = WorldPaths(root, root / "images", refcoco=annotations / "refcoco_shapes.json",
                       manifest=root / "world.json")
    for split in splits:
        mine = [r for r in records if r.split == split]
        paths.detection[split] = _write_json(annotations / f"instances_{split}.json", coco_detection(mine))
        paths.flickr[split] = _write_json(annotations / f"flickr_{split}.json", flickr_entities(mine))
        paths.sft[split] = root / f"sft_{split}.jsonl"
        paths.sft[split].write_text("".join(line + "\n" for line in sft_lines(mine)), encoding="utf-8")
    refs = refcoco_refs(records)
    _write_json(paths.refcoco, refs)
    manifest = {
        "format": "spr-shapes", "version": FORMAT_VERSION, "seed": seed, "image_size": list(config.size),
        "coord_format": coord_format, "num_images": {s: counts[s] for s in splits},
        "num_objects": {s: sum(len(r.scene.objects) for r in records if r.split == s) for s in splits},
        "num_refs": {s: sum(1 for ref in refs if ref["split"] == s) for s in splits},
        "files": paths.to_dict(),
    }
    _write_json(paths.manifest, manifest)
    return paths

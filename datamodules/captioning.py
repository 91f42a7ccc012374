"""Region captioning benchmarks for ``python -m spr_lightning validate`` (SPR Tab. 4): RefCOCOg and Visual Genome.

One sample is one region of one image with the captions that describe it as references. Samples reuse the
grounding datamodules' plumbing (:mod:`datamodules.grounding`): records read once in ``setup``, images opened
lazily and checked against the annotated size, batches as lists of sample dicts, disjoint unpadded shares per
rank under DDP.

Files read (``docs/evaluating_like_the_paper.md`` shows where they come from):

* RefCOCOg: the RefCOCO-layout JSON that ``RefCOCODataModule`` reads (:func:`datamodules.grounding.convert_refer`
  with split ``umd``). One sample per **ref** (referred object): its box is the region, **all** its sentences
  are the references, as captioning evaluations of RefCOCOg do (GRiT, Kosmos-2, GLaMM).
* Visual Genome: ``region_descriptions.json`` (a list of ``{"id": image_id, "regions": [{"region_id",
  "image_id", "phrase", "x", "y", "width", "height"}]}``) + ``image_data.json`` (``{"image_id" | "id", "url",
  "width", "height"}`` per image). One sample per region, its ``phrase`` the one reference. The image file is the
  last two parts of ``url`` (``VG_100K_2/1.jpg``), as the image zips unpack.

A sample is ``{"key", "file_name", "references": [str], "region": Tensor[4] (pixel xyxy), "image" (PIL RGB),
"image_size": (W, H)}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.grounding import (
    REFCOCO_SPLITS,
    GroundingDataset,
    _GroundingDataModule,
    _read_json,
    _size,
    _xywh_box,
    load_refcoco_records,
)

__all__ = [
    "RegionCaptionDataModule",
    "RegionCaptionDataset",
    "load_refcocog_regions",
    "load_vg_regions",
]

SOURCES = ("refcocog", "vg")


def load_refcocog_regions(path: str | Path, split: str | None = "val") -> list[dict[str, Any]]:
    """One record per ref of ``split``: ``{"key": "<ref id>", "file_name", "references": [every sentence],
    "box": [x1, y1, x2, y2], "size"}``, in file order.

    Built on :func:`datamodules.grounding.load_refcoco_records` (same layout, same checks, same error messages),
    regrouping its one-per-sentence samples by ref.
    """
    regions: dict[str, dict[str, Any]] = {}
    for sample in load_refcoco_records(path, split):
        ref_id = sample["key"].rsplit("-", 1)[0]
        region = regions.setdefault(ref_id, {"key": ref_id, "file_name": sample["file_name"], "references": [],
                                             "box": sample["box"], "size": sample["size"]})
        region["references"].append(sample["expression"])
    return list(regions.values())


def _vg_images(path: str | Path) -> dict[int, dict[str, Any]]:
    """``image_data.json`` -> ``{image_id: {"file_name", "size"}}``."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
    images = {}
    for index, entry in enumerate(data):
        image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        where = f"{path}: entry {index} (image_id={image_id!r})"
        if image_id is None:
            raise ValueError(f"{where}: needs 'image_id' (or 'id')")
        url = entry.get("url")
        file_name = "/".join(url.rstrip("/").split("/")[-2:]) if isinstance(url, str) and url else f"{image_id}.jpg"
        images[int(image_id)] = {"file_name": file_name, "size": _size(entry, where)}
    return images


def _image_ids(path: str | Path, split: str | None) -> set[int]:
    """Image ids of a split file: a JSON list of ids, or ``{split: [ids]}`` (densecap's ``densecap_splits.json``)."""
    data = _read_json(path)
    if isinstance(data, dict):
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; the file has {sorted(data)}")
        data = data[split]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of image ids or {{split: [ids]}}")
    return {int(i) for i in data}


def load_vg_regions(
    region_descriptions: str | Path,
    image_data: str | Path,
    image_ids_file: str | Path | None = None,
    split: str | None = "test",
) -> list[dict[str, Any]]:
    """One record per Visual Genome region: ``{"key": "<region_id>", "file_name", "references": [phrase],
    "box": [x1, y1, x2, y2], "size"}``, in file order; only images listed in ``image_ids_file`` when given.

    Raises:
        ValueError: naming the file, the image entry and the region of the first malformed record.
    """
    images = _vg_images(image_data)
    keep = _image_ids(image_ids_file, split) if image_ids_file is not None else None
    data = _read_json(region_descriptions)
    if not isinstance(data, list):
        raise ValueError(f"{region_descriptions}: expected a JSON list of images, got {type(data).__name__}")
    records = []
    for index, entry in enumerate(data):
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if keep is not None and image_id is not None and int(image_id) not in keep:
            continue
        where = f"{region_descriptions}: entry {index} (id={image_id!r})"
        if image_id is None or not isinstance(entry.get("regions"), list):
            raise ValueError(f"{where}: needs 'id' and a 'regions' list")
        if int(image_id) not in images:
            raise ValueError(f"{where}: image {image_id} is not in {image_data}")
        image = images[int(image_id)]
        for j, region in enumerate(entry["regions"]):
            at = f"{where}, region {j} (region_id={region.get('region_id')!r})"
            phrase = region.get("phrase")
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"{at}: 'phrase' must be a non-empty string, got {phrase!r}")
            box = _xywh_box([region.get(k) for k in ("x", "y", "width", "height")], at)
            records.append({"key": str(region.get("region_id", f"{image_id}-{j}")), "file_name": image["file_name"],
                            "references": [phrase.strip()], "box": box, "size": image["size"]})
    return records


class RegionCaptionDataset(GroundingDataset):
    """:class:`datamodules.grounding.GroundingDataset` with the region under the name ``region``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        sample["region"] = sample.pop("target")
        return sample


class RegionCaptionDataModule(_GroundingDataModule):
    """Region captioning on RefCOCOg (``source: refcocog``) or Visual Genome (``source: vg``).

    Args:
        source: ``refcocog`` or ``vg``.
        annotations: RefCOCOg: the RefCOCO-layout JSON (``convert_refer(..., "umd", ...)``); VG:
            ``region_descriptions.json``.
        image_root: RefCOCOg: COCO ``train2014/``; VG: the folder holding ``VG_100K/`` and ``VG_100K_2/``.
        split: RefCOCOg: ``val`` or ``test`` (umd), or ``train``; VG: the key in ``image_ids_file`` when that
            is a ``{split: [ids]}`` file.
        image_data: VG only: ``image_data.json`` (image file names and sizes).
        image_ids_file: VG only: the evaluation images (a JSON list of ids, or ``{split: [ids]}`` such as
            densecap's ``densecap_splits.json``); all images when omitted.
        batch_size: samples per generation batch per device.
        num_workers: dataloader workers per device.
        max_samples: evaluate only the first ``max_samples`` regions (quick checks).
    """

    def __init__(
        self,
        source: str,
        annotations: str,
        image_root: str,
        split: str = "val",
        image_data: str | None = None,
        image_ids_file: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(image_root, batch_size, num_workers, max_samples)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "refcocog" and split not in REFCOCO_SPLITS:
            raise ValueError(f"split must be one of {REFCOCO_SPLITS} for refcocog, got {split!r}")
        if source == "vg" and image_data is None:
            raise ValueError("source 'vg' needs image_data (Visual Genome's image_data.json)")
        self.source = source
        self.annotations = annotations
        self.split = split
        self.image_data = image_data
        self.image_ids_file = image_ids_file

    def _load_records(self) -> list[dict[str, Any]]:
        if self.source == "refcocog":
            return load_refcocog_regions(self.annotations, self.split)
        return load_vg_regions(self.annotations, self.image_data, self.image_ids_file, self.split)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            records = self._load_records()
            if self.max_samples is not None:
                records = records[: self.max_samples]
            self.dataset = RegionCaptionDataset(records, self.image_root)

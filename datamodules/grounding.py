"""Grounding benchmarks for ``python -m spr_lightning validate``: RefCOCO/+/g (REC) and Flickr30k Entities.

Both datamodules read the annotation JSON once in ``setup`` into small plain records (no image loaded), and
open each image lazily in the dataset. A batch is the list of sample dicts as they are (images stay PIL
images): prompts and processor inputs belong to the evaluator, which owns the model's processor.

Files and layouts read (``docs/evaluation.md`` shows how to produce them):

* RefCOCO/+/g: a JSON list of refs, one per referred object, ``{"id", "file_name" | "image", "sents" |
  "expression", "bbox": [x, y, w, h], "split", "height", "width"}``; one sample per (ref, sentence).
  :func:`convert_refer` writes it from the refer toolkit's ``refs(unc).p`` + ``instances.json``.
* Flickr30k Entities: MDETR's ``final_flickr_separateGT_{val,test}.json`` (COCO layout, one image entry per
  image-caption pair); one sample per entry, with its phrases and their ground-truth boxes.

Under DDP every rank reads a disjoint, unpadded share of the samples, so each sample is scored exactly once.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from datamodules.regions import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, open_rgb_image
from spr_lightning.boxes import convert_box

__all__ = [
    "REFCOCO_SPLITS",
    "Flickr30kEntitiesDataModule",
    "GroundingDataset",
    "RefCOCODataModule",
    "convert_refer",
    "load_flickr_records",
    "load_refcoco_records",
    "refer_to_records",
]

REFCOCO_SPLITS = ("train", "val", "test", "testA", "testB")


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _xywh_box(value: Any, where: str) -> list[float]:
    """A COCO ``[x, y, w, h]`` -> pixel ``[x1, y1, x2, y2]``, refusing what is not a box."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: 'bbox' must be [x, y, w, h], got {value!r}")
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'bbox' must hold 4 numbers, got {value!r}") from None
    if w < 0 or h < 0:
        raise ValueError(f"{where}: 'bbox' has a negative width or height: {value!r}")
    return list(convert_box((x, y, w, h), "xywh", "xyxy"))


def _size(entry: dict[str, Any], where: str) -> tuple[int, int] | None:
    """``(W, H)`` from ``width``/``height`` (MDETR writes them as strings), or None when absent."""
    if "width" not in entry or "height" not in entry:
        return None
    try:
        return int(entry["width"]), int(entry["height"])
    except (TypeError, ValueError):
        got = f"{entry['width']!r}/{entry['height']!r}"
        raise ValueError(f"{where}: 'width'/'height' must be integers, got {got}") from None


# ----------------------------------------------------------------------------------------------- RefCOCO
def _sentences(entry: dict[str, Any], where: str) -> list[str]:
    """``sents`` (strings, or refer-toolkit ``{"sent": ...}`` dicts) or a single ``expression``."""
    if "sents" in entry:
        sents = entry["sents"]
        if not isinstance(sents, list):
            raise ValueError(f"{where}: 'sents' must be a list, got {type(sents).__name__}")
        out = [s.get("sent") if isinstance(s, dict) else s for s in sents]
    elif "expression" in entry:
        out = [entry["expression"]]
    else:
        raise ValueError(f"{where}: needs 'sents' (list) or 'expression' (string)")
    if not out or not all(isinstance(s, str) and s.strip() for s in out):
        raise ValueError(f"{where}: every referring expression must be a non-empty string, got {out!r}")
    return [s.strip() for s in out]


def load_refcoco_records(path: str | Path, split: str | None = "val") -> list[dict[str, Any]]:
    """One REC sample per (ref, sentence) of ``split``, in file order.

    Entries whose ``split`` differs are skipped; entries without ``split`` are kept (files holding one split).

    Returns:
        Dicts ``{"key": "<id>-<sentence index>", "file_name", "expression", "box": [x1, y1, x2, y2],
        "size": (W, H) | None}``.

    Raises:
        ValueError: naming the file and the entry (index and id) of the first malformed record.
    """
    if split is not None and split not in REFCOCO_SPLITS:
        raise ValueError(f"split must be one of {REFCOCO_SPLITS} or None, got {split!r}")
    data = _read_json(path)
    if isinstance(data, dict) and "refs" in data:
        data = data["refs"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of refs, got {type(data).__name__}")
    samples = []
    for index, entry in enumerate(data):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        ref_id = entry.get("id", entry.get("ref_id", index))
        where = f"{where} (id={ref_id!r})"
        if split is not None and entry.get("split", split) != split:
            continue
        file_name = entry.get("file_name", entry.get("image"))
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(f"{where}: needs 'file_name' or 'image' (image path relative to image_root)")
        box, size = _xywh_box(entry.get("bbox"), where), _size(entry, where)
        for j, sentence in enumerate(_sentences(entry, where)):
            samples.append({"key": f"{ref_id}-{j}", "file_name": file_name, "expression": sentence, "box": box,
                            "size": size})
    return samples


def refer_to_records(refs: Sequence[dict[str, Any]], instances: dict[str, Any]) -> list[dict[str, Any]]:
    """The refer toolkit's refs + COCO ``instances.json`` -> the RefCOCO JSON layout read here.

    The image name comes from ``instances.json``: a ref's own ``file_name`` carries the annotation id as a suffix
    (``COCO_train2014_000000581857_16.jpg``) and names no real file. Sentences are the toolkit's ``sent``
    (lower-cased, tokenised), as Shikra, Ferret and lmms-eval use them.
    """
    images = {image["id"]: image for image in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    records = []
    for ref in refs:
        image, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        records.append({
            "id": ref["ref_id"], "image_id": ref["image_id"], "file_name": image["file_name"],
            "sents": [s["sent"] for s in ref["sentences"]], "bbox": ann["bbox"], "split": ref["split"],
            "height": image["height"], "width": image["width"],
        })
    return records


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers): any class or function a pickle names is
    refused, so a crafted file cannot run code. The refer toolkit's ``refs(*).p`` files hold plain data."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only plain lists, dicts, strings and numbers are read from pickles"
        )


def load_plain_pickle(path: str | Path) -> Any:
    """A pickle of plain data (see :class:`_PlainDataUnpickler`); ``ValueError`` naming the file otherwise."""
    with Path(path).open("rb") as f:
        try:
            return _PlainDataUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles (refer toolkit)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
            raise ValueError(f"{path}: not a plain-data pickle: {exc}") from exc


def convert_refer(refer_dir: str | Path, split_by: str, out_path: str | Path) -> int:
    """Write ``out_path`` from ``<refer_dir>/refs(<split_by>).p`` and ``<refer_dir>/instances.json``.

    E.g. ``convert_refer("data/refcoco", "unc", "data/refcoco/refcoco_unc.json")`` (RefCOCO and RefCOCO+:
    ``unc``; RefCOCOg: ``umd``). The pickle is read with :func:`load_plain_pickle`, which runs no code from it.

    Returns:
        The number of refs written.
    """
    refer_dir = Path(refer_dir)
    refs = load_plain_pickle(refer_dir / f"refs({split_by}).p")
    records = refer_to_records(refs, _read_json(refer_dir / "instances.json"))
    Path(out_path).write_text(json.dumps(records), encoding="utf-8")
    return len(records)


# -------------------------------------------------------------------------------------- Flickr30k Entities
def _span(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: a token span is [start, end] character offsets, got {value!r}")
    return int(value[0]), int(value[1])


def _phrase_spans(image: dict[str, Any], anns: list[dict[str, Any]], where: str) -> list[tuple[int, int]]:
    """The evaluated phrases of one caption: ``tokens_positive_eval`` (MDETR: one ``[[start, end]]`` per phrase
    that has a box, in caption order), else the distinct annotation spans in caption order."""
    if "tokens_positive_eval" in image:
        spans = []
        for entry in image["tokens_positive_eval"]:
            if not isinstance(entry, list) or not entry:
                raise ValueError(f"{where}: 'tokens_positive_eval' entries are [[start, end], ...], got {entry!r}")
            spans.append(_span(entry[0], where))
        return spans
    found = {_span(s, where) for ann in anns for s in ann.get("tokens_positive", [])}
    return sorted(found)


def load_flickr_records(path: str | Path) -> list[dict[str, Any]]:
    """One phrase-grounding sample per image-caption entry of an MDETR Flickr30k Entities file.

    A phrase's ground truth is every annotation whose ``tokens_positive`` holds the phrase's span (MDETR links
    boxes to phrases this way; a box shared by coreferent phrases lists all their spans). A phrase no
    annotation covers keeps ``[]`` boxes, so the metric skips it, as MDETR's evaluator does.

    Returns:
        Dicts ``{"key": "<original_img_id>_<sentence_id>", "file_name", "caption", "phrases": [str],
        "boxes": [[[x1, y1, x2, y2], ...] per phrase], "size": (W, H) | None}``.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a COCO-layout object with an 'images' list (MDETR Flickr30k file)")
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for index, ann in enumerate(data.get("annotations", [])):
        where = f"{path}: annotations[{index}] (id={ann.get('id')!r})"
        if "image_id" not in ann or "tokens_positive" not in ann:
            raise ValueError(f"{where}: needs 'image_id', 'bbox' and 'tokens_positive'")
        by_image.setdefault(ann["image_id"], []).append({**ann, "_xyxy": _xywh_box(ann.get("bbox"), where)})
    samples = []
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}] (id={image.get('id')!r})"
        caption, file_name = image.get("caption"), image.get("file_name")
        if not isinstance(caption, str) or not isinstance(file_name, str):
            raise ValueError(f"{where}: needs 'file_name' and 'caption' strings")
        anns = by_image.get(image.get("id"), [])
        phrases, boxes = [], []
        for start, end in _phrase_spans(image, anns, where):
            if not 0 <= start < end <= len(caption):
                raise ValueError(f"{where}: span [{start}, {end}] lies outside the caption {caption!r}")
            phrases.append(caption[start:end])
            boxes.append([a["_xyxy"] for a in anns
                          if any(_span(s, where) == (start, end) for s in a.get("tokens_positive", []))])
        key = f"{image.get('original_img_id', image.get('id'))}_{image.get('sentence_id', index)}"
        samples.append({"key": key, "file_name": file_name, "caption": caption, "phrases": phrases,
                        "boxes": boxes, "size": _size(image, where)})
    return samples


# ------------------------------------------------------------------------------------------ dataset + DMs
class GroundingDataset(Dataset):
    """Records from the loaders above, with their image opened (RGB) and boxes as float tensors.

    REC samples get ``target: [4]``; phrase samples get ``targets: [Tensor[G_i, 4]]``. Both get ``image`` (PIL)
    and ``image_size`` ``(W, H)``.

    Raises:
        FileNotFoundError: naming the sample and the path when the image is missing.
        ValueError: naming the sample when the image is corrupt, larger than ``max_image_pixels`` or not the
            annotated ``width``/``height`` (usually an ``image_root`` pointing at resized copies, which would
            silently misplace every box). Samples are never skipped: that would change the metric's denominator.
    """

    def __init__(self, records: list[dict[str, Any]], image_root: str | Path,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.records = records
        self.image_root = Path(image_root)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        path = self.image_root / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"sample {record['key']!r}: image not found: {path}")
        size = tuple(record["size"]) if record["size"] is not None else None
        try:
            image = open_rgb_image(path, str(path), max_pixels=self.max_image_pixels, expected_size=size)
        except ImageLoadError as exc:
            raise ValueError(f"sample {record['key']!r}: {exc}") from exc
        sample = {k: v for k, v in record.items() if k not in ("box", "boxes", "size")}
        sample.update(image=image, image_size=image.size)
        if "box" in record:
            sample["target"] = torch.tensor(record["box"], dtype=torch.float32)
        else:
            sample["targets"] = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in record["boxes"]]
        return sample


def collate_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch is the list of samples: the evaluator builds prompts and model inputs itself."""
    return samples


class _GroundingDataModule(LightningDataModule):
    """Shared loader plumbing: the same samples for ``validate`` and ``test``, unpadded under DDP."""

    def __init__(self, image_root: str, batch_size: int, num_workers: int, max_samples: int | None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__()
        self.image_root = image_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self.max_image_pixels = max_image_pixels
        self.dataset: GroundingDataset | None = None

    def _load_records(self) -> list[dict[str, Any]]:
        """The benchmark's samples; subclasses that use the default ``setup`` read their file layout here."""
        raise TypeError(f"{type(self).__name__} must define _load_records() or its own setup()")

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            records = self._load_records()
            if self.max_samples is not None:
                records = records[: self.max_samples]
            self.dataset = GroundingDataset(records, self.image_root, self.max_image_pixels)

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = UnrepeatedDistributedSampler(self.dataset, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_samples,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class RefCOCODataModule(_GroundingDataModule):
    """Referring expression comprehension on RefCOCO, RefCOCO+ or RefCOCOg.

    Args:
        annotations: the RefCOCO-layout JSON (see the module docstring and :func:`convert_refer`).
        image_root: folder the ``file_name`` entries are relative to (COCO ``train2014``).
        split: ``val``, ``testA``, ``testB`` (RefCOCO/+), ``test`` (RefCOCOg umd), or ``train``.
        batch_size: samples per generation batch per device.
        num_workers: dataloader workers per device.
        max_samples: evaluate only the first ``max_samples`` samples (quick checks).
        max_image_pixels: images with more pixels are refused before decoding (decompression-bomb guard);
            ``None``: only PIL's own guard applies.
    """

    def __init__(self, annotations: str, image_root: str, split: str = "val", batch_size: int = 8,
                 num_workers: int = 2, max_samples: int | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__(image_root, batch_size, num_workers, max_samples, max_image_pixels)
        if split not in REFCOCO_SPLITS:
            raise ValueError(f"split must be one of {REFCOCO_SPLITS}, got {split!r}")
        self.annotations = annotations
        self.split = split

    def _load_records(self) -> list[dict[str, Any]]:
        return load_refcoco_records(self.annotations, self.split)


class Flickr30kEntitiesDataModule(_GroundingDataModule):
    """Phrase grounding on Flickr30k Entities, one sample per image-caption pair.

    Args:
        annotations: MDETR's ``final_flickr_separateGT_val.json`` or ``..._test.json`` (``mergedGT`` also works).
        image_root: the ``flickr30k-images`` folder.
        batch_size: samples per generation batch per device.
        num_workers: dataloader workers per device.
        max_samples: evaluate only the first ``max_samples`` image-caption pairs.
        max_image_pixels: images with more pixels are refused before decoding (decompression-bomb guard);
            ``None``: only PIL's own guard applies.
    """

    def __init__(self, annotations: str, image_root: str, batch_size: int = 8, num_workers: int = 2,
                 max_samples: int | None = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__(image_root, batch_size, num_workers, max_samples, max_image_pixels)
        self.annotations = annotations

    def _load_records(self) -> list[dict[str, Any]]:
        return load_flickr_records(self.annotations)

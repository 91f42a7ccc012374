"""Read COCO-layout detection annotations (COCO, LVIS, Objects365) into one index, and filter it (SPR appendix).

The JSON is parsed once into flat arrays sorted by image (``xyxy`` float64 boxes, areas, category ids,
annotation ids, crowd flags) with per-image offsets, so that a full Objects365 file (about 25M boxes) is held
as a few arrays rather than millions of Python objects, and every later lookup is a slice.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

OnError = Literal["raise", "skip"]


def normalize_label(name: str) -> str:
    """Category name as it reads in a prompt: LVIS ``baseball_bat`` -> ``baseball bat``; Objects365
    ``Person`` -> ``person``. Grounding models such as GroundingDINO lowercase text anyway."""
    return " ".join(name.replace("_", " ").split()).lower()


@dataclass(frozen=True)
class ImageInfo:
    """One image of the annotation file; ``file_name`` is relative to the dataset's image root."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageObjects:
    """The objects of one image. ``boxes`` are ``[N, 4]`` float64 ``xyxy`` pixels clipped to the image;
    ``areas`` are the clipped box areas ``w * h`` (see :func:`filter_annotations`)."""

    boxes: torch.Tensor
    areas: torch.Tensor
    labels: list[str]
    category_ids: list[int]
    annotation_ids: list[int]
    iscrowd: torch.Tensor


class AnnotationIndex:
    """Images and their objects, built once by :func:`load_annotations` and filtered by :func:`filter_annotations`.

    Attributes:
        source: the file (or name) it was read from, used in error messages.
        images: ``{image_id: ImageInfo}`` in file order.
        categories: ``{category_id: label}`` (labels after ``label_fn``).
        skipped: how many invalid entries (images, categories, annotations) were skipped with ``on_error="skip"``.
        skip_reasons: the same count split by reason.
    """

    def __init__(
        self,
        source: str,
        images: dict[int, ImageInfo],
        categories: dict[int, str],
        arrays: dict[str, np.ndarray],
        skipped: int = 0,
        skip_reasons: Counter[str] | None = None,
    ) -> None:
        self.source = source
        self.images = images
        self.categories = categories
        self.skipped = skipped
        self.skip_reasons = skip_reasons if skip_reasons is not None else Counter()
        order = np.argsort(arrays["image_pos"], kind="stable")
        self._arrays = {k: v[order] for k, v in arrays.items()}
        self._pos = {image_id: i for i, image_id in enumerate(images)}
        counts = np.bincount(self._arrays["image_pos"], minlength=len(images))
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.images

    @property
    def image_ids(self) -> list[int]:
        return list(self.images)

    @property
    def num_annotations(self) -> int:
        return int(self._offsets[-1])

    def _slice(self, image_id: int) -> slice:
        if image_id not in self._pos:
            raise KeyError(f"{self.source}: no image with id {image_id}")
        pos = self._pos[image_id]
        return slice(int(self._offsets[pos]), int(self._offsets[pos + 1]))

    def num_objects(self, image_id: int) -> int:
        s = self._slice(image_id)
        return s.stop - s.start

    def objects(self, image_id: int) -> ImageObjects:
        """The objects of one image (a slice of the index: no file access)."""
        s = self._slice(image_id)
        a = self._arrays
        cats = a["category_id"][s].tolist()
        return ImageObjects(
            boxes=torch.from_numpy(a["boxes"][s].copy()),
            areas=torch.from_numpy(a["area"][s].copy()),
            labels=[self.categories[c] for c in cats],
            category_ids=cats,
            annotation_ids=a["ann_id"][s].tolist(),
            iscrowd=torch.from_numpy(a["iscrowd"][s].copy()),
        )

    def _select(self, keep_objects: np.ndarray, keep_images: Iterable[int]) -> AnnotationIndex:
        """New index with only the objects where ``keep_objects`` (over all annotations) is true, on the images
        listed in ``keep_images`` (order of this index is kept)."""
        wanted = set(keep_images)
        images = {i: info for i, info in self.images.items() if i in wanted}
        old_pos = np.array([self._pos[i] for i in images], dtype=np.int64)
        remap = np.full(len(self.images), -1, dtype=np.int64)
        remap[old_pos] = np.arange(len(old_pos))
        new_pos = remap[self._arrays["image_pos"]]
        mask = np.asarray(keep_objects, dtype=bool) & (new_pos >= 0)
        arrays = {k: v[mask] for k, v in self._arrays.items()}
        arrays["image_pos"] = new_pos[mask]
        return AnnotationIndex(
            self.source, images, dict(self.categories), arrays, self.skipped, Counter(self.skip_reasons)
        )

    def subset(self, image_ids: Iterable[int]) -> AnnotationIndex:
        """New index with only ``image_ids`` (e.g. the paper's random 10k images), all their objects kept."""
        ids = list(image_ids)
        unknown = [i for i in ids if i not in self.images]
        if unknown:
            raise KeyError(f"{self.source}: no images with ids {unknown[:5]}")
        return self._select(np.ones(self.num_annotations, dtype=bool), ids)


def filter_annotations(
    index: AnnotationIndex,
    min_object_area: float = 300.0,
    min_objects: int = 8,
    drop_crowd: bool = True,
    drop_crowd_images: bool = False,
) -> AnnotationIndex:
    """SPR appendix preprocessing: drop small objects, then keep images with more than ``min_objects`` objects.

    Area is the box area ``w * h`` (of the box clipped to the image), not COCO's ``area`` field: Objects365 has
    no segmentation, so its ``area`` is a box area anyway, while COCO/LVIS ``area`` is a mask area; one rule for
    every source keeps "area < 300" meaning the same thing on all of them.

    Crowd boxes (``iscrowd=1``) cover many instances at once. The paper re-annotates them with GroundingDINO;
    this project drops them by default instead (``drop_crowd``). The people in a dropped crowd box then have no
    box at all, so ``drop_crowd_images`` drops whole images holding a crowd box, for data closest to fully
    annotated.

    Args:
        index: from :func:`load_annotations`.
        min_object_area: objects with box area below this are removed (300 px² in SPR; 300 itself is kept);
            zero-area boxes are removed even with ``min_object_area=0``.
        min_objects: images keep only if they have strictly more objects than this after the object filters
            (SPR: "images containing more than eight objects").
        drop_crowd: remove crowd objects before counting.
        drop_crowd_images: remove every image that has a crowd object.
    """
    arrays = index._arrays  # same module: the filters are vectorised over the flat arrays
    # Zero-area boxes (w or h of 0, or wholly outside the image once clipped) are never objects, whatever
    # min_object_area says: nothing can be described there and their IoU with anything is undefined.
    keep = (arrays["area"] >= min_object_area) & (arrays["area"] > 0)
    crowd = arrays["iscrowd"]
    if drop_crowd:
        keep &= ~crowd
    image_pos = arrays["image_pos"]
    counts = np.bincount(image_pos[keep], minlength=len(index))
    keep_image = counts > min_objects
    if drop_crowd_images:
        keep_image &= np.bincount(image_pos[crowd], minlength=len(index)) == 0
    ids = [image_id for image_id, k in zip(index.images, keep_image.tolist()) if k]
    return index._select(keep, ids)


class _Reporter:
    """Raise or count invalid entries, with messages that name the file and the entry."""

    def __init__(self, source: str, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source, self.on_error = source, on_error
        self.skipped: Counter[str] = Counter()

    def invalid(self, kind: str, entry_id: Any, reason: str, detail: Any = None) -> None:
        """``reason`` is the fixed text counted in ``skip_reasons``; ``detail`` the offending value."""
        if self.on_error == "raise":
            suffix = "" if detail is None else f": {detail!r}"
            raise ValueError(f"{self.source}: invalid {kind} id={entry_id!r}: {reason}{suffix}")
        self.skipped[f"{kind}: {reason}"] += 1


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _file_name(img: Mapping[str, Any]) -> str | None:
    """COCO/Objects365 ``file_name``; LVIS has only ``coco_url``, whose last two parts (``train2017/x.jpg``)
    name the file under a COCO image root (as detectron2's LVIS loader does)."""
    if isinstance(img.get("file_name"), str):
        return img["file_name"]
    if isinstance(img.get("coco_url"), str):
        return "/".join(img["coco_url"].split("/")[-2:])
    return None


def _read_images(raw: list[Any], rep: _Reporter) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for i, img in enumerate(raw):
        if not isinstance(img, Mapping) or not isinstance(img.get("id"), int) or isinstance(img.get("id"), bool):
            rep.invalid("image", img.get("id", f"#{i}") if isinstance(img, Mapping) else f"#{i}", "missing integer id")
            continue
        w, h, name = _number(img.get("width")), _number(img.get("height")), _file_name(img)
        if name is None:
            rep.invalid("image", img["id"], "missing file_name (or coco_url)")
        elif w is None or h is None or w <= 0 or h <= 0 or not (w.is_integer() and h.is_integer()):
            rep.invalid(
                "image",
                img["id"],
                "width/height must be positive integers",
                (img.get("width"), img.get("height")),
            )
        elif img["id"] in images:
            rep.invalid("image", img["id"], "duplicate image id")
        else:
            images[img["id"]] = ImageInfo(img["id"], name, int(w), int(h))
    return images


def _read_categories(raw: list[Any], rep: _Reporter, label_fn: Callable[[str], str]) -> dict[int, str]:
    categories: dict[int, str] = {}
    for i, cat in enumerate(raw):
        cid = cat.get("id", f"#{i}") if isinstance(cat, Mapping) else f"#{i}"
        if not isinstance(cid, int) or not isinstance(cat.get("name"), str):
            rep.invalid("category", cid, "needs an integer id and a string name")
        else:
            categories[cid] = label_fn(cat["name"])
    return categories


def _read_annotations(
    raw: list[Any], images: dict[int, ImageInfo], categories: dict[int, str], rep: _Reporter
) -> dict[str, np.ndarray]:
    pos = {image_id: i for i, image_id in enumerate(images)}
    rows: list[tuple[float, float, float, float]] = []
    area, cat_ids, ann_ids, crowd, image_pos = [], [], [], [], []
    seen: set[int] = set()
    for i, ann in enumerate(raw):
        aid = ann.get("id", f"#{i}") if isinstance(ann, Mapping) else f"#{i}"
        missing = [k for k in ("id", "image_id", "bbox", "category_id") if not isinstance(ann, Mapping) or k not in ann]
        if missing:
            rep.invalid("annotation", aid, "missing fields", missing)
            continue
        if not isinstance(ann["id"], int) or isinstance(ann["id"], bool):
            rep.invalid("annotation", aid, "id must be an integer", ann["id"])
            continue
        if ann["id"] in seen:  # a merged or concatenated file: the second copy would double the object
            rep.invalid("annotation", aid, "duplicate annotation id")
            continue
        seen.add(ann["id"])
        bbox = ann["bbox"]
        xywh = [_number(v) for v in bbox] if isinstance(bbox, list | tuple) and len(bbox) == 4 else None
        if xywh is None or any(v is None for v in xywh):
            rep.invalid("annotation", aid, "bbox must be 4 finite numbers [x, y, w, h]", bbox)
            continue
        x, y, w, h = xywh
        if w < 0 or h < 0:
            rep.invalid("annotation", aid, "negative width/height in bbox", bbox)
            continue
        if ann["image_id"] not in pos:
            rep.invalid("annotation", aid, "unknown image id", ann["image_id"])
            continue
        if ann["category_id"] not in categories:
            rep.invalid("annotation", aid, "unknown category id", ann["category_id"])
            continue
        info = images[ann["image_id"]]
        # Clip to the image; subtracting the cut-off parts (not recomputing x2 - x1) keeps w * h exact inside.
        cw = max(0.0, w - max(0.0, -x) - max(0.0, x + w - info.width))
        ch = max(0.0, h - max(0.0, -y) - max(0.0, y + h - info.height))
        x1, y1 = min(max(x, 0.0), float(info.width)), min(max(y, 0.0), float(info.height))
        rows.append((x1, y1, min(x1 + cw, float(info.width)), min(y1 + ch, float(info.height))))
        area.append(cw * ch)
        cat_ids.append(ann["category_id"])
        ann_ids.append(ann["id"])
        crowd.append(bool(ann.get("iscrowd", 0)))
        image_pos.append(pos[ann["image_id"]])
    return {
        "boxes": np.asarray(rows, dtype=np.float64).reshape(-1, 4),
        "area": np.asarray(area, dtype=np.float64),
        "category_id": np.asarray(cat_ids, dtype=np.int64),
        "ann_id": np.asarray(ann_ids, dtype=np.int64),
        "iscrowd": np.asarray(crowd, dtype=bool),
        "image_pos": np.asarray(image_pos, dtype=np.int64),
    }


def load_annotations(
    source: str | os.PathLike[str] | Mapping[str, Any],
    on_error: OnError = "raise",
    label_fn: Callable[[str], str] = normalize_label,
    name: str | None = None,
) -> AnnotationIndex:
    """Parse a COCO-layout annotation file (COCO, LVIS, Objects365; ``.json`` or ``.json.gz``) once into an index.

    Boxes arrive as ``[x, y, w, h]`` and are stored as ``xyxy`` pixels clipped to the image. An annotation with
    missing fields, non-finite numbers, negative width/height, or an unknown image/category id is invalid:
    ``on_error="raise"`` raises ``ValueError`` naming the file and the annotation id; ``on_error="skip"`` drops
    it and counts it in ``index.skipped``. Images without a usable id/size/file name, and repeated image or
    annotation ids, are treated the same way. A box reaching outside the image is clipped to it (not an error:
    COCO has many that overhang by a fraction of a pixel).

    Args:
        source: path to the JSON file, or the already-parsed dict.
        on_error: ``"raise"`` or ``"skip"``.
        label_fn: maps category names to prompt labels (default :func:`normalize_label`).
        name: name used in messages when ``source`` is a dict.
    """
    if isinstance(source, Mapping):
        data, src = source, name or "<annotations dict>"
    else:
        src = os.fspath(source)
        opener = gzip.open if src.endswith(".gz") else open
        try:
            with opener(src, "rb") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}: not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{src}: not a COCO-layout file, lacks list(s) {missing}")
    rep = _Reporter(src, on_error)
    images = _read_images(data["images"], rep)
    categories = _read_categories(data["categories"], rep, label_fn)
    arrays = _read_annotations(data["annotations"], images, categories, rep)
    return AnnotationIndex(src, images, categories, arrays, sum(rep.skipped.values()), rep.skipped)

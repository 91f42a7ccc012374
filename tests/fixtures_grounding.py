"""Small grounding benchmarks on disk, in the real file layouts, with real generated images.

``write_refcoco_fixture(dir)`` writes a RefCOCO-layout JSON (the layout ``RefCOCODataModule`` reads) and
``write_flickr_fixture(dir)`` an MDETR-layout Flickr30k Entities file, each with JPEG images of coloured
rectangles drawn exactly where the annotations put them. Both return the paths and the expected samples, so
tests (and other test files) can check what the datamodules read without repeating the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def _draw(path: Path, size: tuple[int, int], boxes_xywh: list[list[float]], seed: int) -> None:
    """A textured background with one filled rectangle per box (so the images are real, varied pictures)."""
    w, h = size
    image = Image.new("RGB", size, (40 + 20 * seed, 60, 80))
    draw = ImageDraw.Draw(image)
    for i in range(0, w, 8):
        draw.line([(i, 0), (i, h)], fill=(50 + 10 * seed, 70, 90))
    palette = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 20)]
    for j, (x, y, bw, bh) in enumerate(boxes_xywh):
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=palette[j % len(palette)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


def write_refcoco_fixture(directory: str | Path) -> dict[str, Any]:
    """Three COCO-like images and four refs (``val``: two refs, three sentences; ``testA``: one; ``testB``: one).

    Returns:
        ``{"annotations": path, "image_root": path, "val": [expected samples], "testA": [...], "testB": [...]}``
        where an expected sample is ``{"key", "file_name", "expression", "box": [x1, y1, x2, y2]}``.
    """
    root = Path(directory)
    images = {
        "COCO_train2014_000000000001.jpg": ((96, 64), [[8, 8, 32, 24], [56, 30, 30, 28]]),
        "COCO_train2014_000000000002.jpg": ((80, 80), [[10, 40, 40, 30]]),
        "COCO_train2014_000000000003.jpg": ((64, 96), [[4, 4, 50, 40]]),
    }
    for seed, (name, (size, boxes)) in enumerate(images.items()):
        _draw(root / "images" / name, size, boxes, seed)
    refs = [
        {"id": 101, "image_id": 1, "file_name": "COCO_train2014_000000000001.jpg", "split": "val",
         "sents": ["red box on the left", "the top left red one"], "bbox": [8, 8, 32, 24], "height": 64, "width": 96},
        {"id": 102, "image_id": 1, "file_name": "COCO_train2014_000000000001.jpg", "split": "val",
         "sents": [{"sent": "green box", "raw": "Green box"}], "bbox": [56, 30, 30, 28], "height": 64, "width": 96},
        {"id": 201, "image_id": 2, "image": "COCO_train2014_000000000002.jpg", "split": "testA",
         "expression": "the red rectangle", "bbox": [10, 40, 40, 30], "height": 80, "width": 80},
        {"id": 301, "image_id": 3, "file_name": "COCO_train2014_000000000003.jpg", "split": "testB",
         "sents": ["big red block"], "bbox": [4, 4, 50, 40], "height": 96, "width": 64},
    ]
    annotations = root / "refcoco_unc.json"
    annotations.write_text(json.dumps(refs), encoding="utf-8")
    img1 = "COCO_train2014_000000000001.jpg"
    return {
        "annotations": str(annotations),
        "image_root": str(root / "images"),
        "val": [
            {"key": "101-0", "file_name": img1, "expression": "red box on the left", "box": [8, 8, 40, 32]},
            {"key": "101-1", "file_name": img1, "expression": "the top left red one", "box": [8, 8, 40, 32]},
            {"key": "102-0", "file_name": img1, "expression": "green box", "box": [56, 30, 86, 58]},
        ],
        "testA": [{"key": "201-0", "file_name": "COCO_train2014_000000000002.jpg",
                   "expression": "the red rectangle", "box": [10, 40, 50, 70]}],
        "testB": [{"key": "301-0", "file_name": "COCO_train2014_000000000003.jpg", "expression": "big red block",
                   "box": [4, 4, 54, 44]}],
    }


def _spans(caption: str, *phrases: str) -> list[list[int]]:
    out = []
    for phrase in phrases:
        start = caption.index(phrase)
        out.append([start, start + len(phrase)])
    return out


def write_flickr_fixture(directory: str | Path) -> dict[str, Any]:
    """Two Flickr-like images, three image-caption entries, in MDETR's ``final_flickr_separateGT`` layout.

    Covers what the real file has: one entry per caption (an image repeated), ``width``/``height`` as strings
    (MDETR writes them from XML), a phrase with two boxes, one box shared by two coreferent phrases (its
    ``tokens_positive`` lists both spans), and a listed phrase no annotation covers (kept with no boxes).

    Returns:
        ``{"annotations": path, "image_root": path, "samples": [expected samples]}`` where an expected sample is
        ``{"key", "file_name", "caption", "phrases": [...], "boxes": [[[x1, y1, x2, y2], ...] per phrase]}``.
    """
    root = Path(directory)
    _draw(root / "images" / "1000.jpg", (100, 80), [[10, 10, 30, 50], [60, 40, 20, 20], [70, 5, 20, 20]], 0)
    _draw(root / "images" / "2000.jpg", (90, 90), [[5, 5, 40, 40]], 1)
    cap0 = "A man and two dogs play in a park ."
    cap1 = "A person walks two small dogs and the person smiles ."
    cap2 = "A red kite flies ."
    sp0 = _spans(cap0, "A man", "two dogs", "a park")
    sp1 = _spans(cap1, "A person", "two small dogs", "the person")
    sp2 = _spans(cap2, "A red kite")
    images = [
        {"file_name": "1000.jpg", "height": "80", "width": "100", "id": 0, "caption": cap0, "dataset_name": "flickr",
         "tokens_negative": [[0, len(cap0)]], "sentence_id": 0, "original_img_id": 1000,
         "tokens_positive_eval": [[s] for s in sp0]},
        {"file_name": "1000.jpg", "height": "80", "width": "100", "id": 1, "caption": cap1, "dataset_name": "flickr",
         "tokens_negative": [[0, len(cap1)]], "sentence_id": 1, "original_img_id": 1000,
         "tokens_positive_eval": [[s] for s in sp1]},
        {"file_name": "2000.jpg", "height": "90", "width": "90", "id": 2, "caption": cap2, "dataset_name": "flickr",
         "tokens_negative": [[0, len(cap2)]], "sentence_id": 0, "original_img_id": 2000,
         "tokens_positive_eval": [[s] for s in sp2]},
    ]

    def ann(i: int, image_id: int, bbox: list[int], spans: list[list[int]], phrase_id: int) -> dict[str, Any]:
        return {"area": bbox[2] * bbox[3], "iscrowd": 0, "image_id": image_id, "category_id": 1, "id": i,
                "bbox": bbox, "tokens_positive": spans, "phrase_ids": phrase_id}

    annotations = [
        ann(0, 0, [10, 10, 30, 50], [sp0[0]], 0),  # "A man"
        ann(1, 0, [60, 40, 20, 20], [sp0[1]], 1),  # "two dogs": two boxes
        ann(2, 0, [70, 5, 20, 20], [sp0[1]], 1),
        ann(3, 1, [10, 10, 30, 50], [sp1[0], sp1[2]], 0),  # "A person" = "the person"
        ann(4, 1, [60, 40, 20, 20], [sp1[1]], 1),
        ann(5, 1, [70, 5, 20, 20], [sp1[1]], 1),
        ann(6, 2, [5, 5, 40, 40], [sp2[0]], 0),    # "A red kite"
    ]
    layout = {"info": [], "licenses": [], "images": images, "annotations": annotations,
              "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}
    path = root / "final_flickr_separateGT_val.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    return {
        "annotations": str(path),
        "image_root": str(root / "images"),
        "samples": [
            {"key": "1000_0", "file_name": "1000.jpg", "caption": cap0, "phrases": ["A man", "two dogs", "a park"],
             "boxes": [[[10, 10, 40, 60]], [[60, 40, 80, 60], [70, 5, 90, 25]], []]},
            {"key": "1000_1", "file_name": "1000.jpg", "caption": cap1, "phrases": ["A person", "two small dogs",
             "the person"], "boxes": [[[10, 10, 40, 60]], [[60, 40, 80, 60], [70, 5, 90, 25]], [[10, 10, 40, 60]]]},
            {"key": "2000_0", "file_name": "2000.jpg", "caption": cap2, "phrases": ["A red kite"],
             "boxes": [[[5, 5, 45, 45]]]},
        ],
    }

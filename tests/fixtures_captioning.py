"""Small region-captioning and POPE benchmarks on disk, in the real file layouts, with real generated images.

* RefCOCOg captioning reuses :func:`fixtures_grounding.write_refcoco_fixture` (the same RefCOCO-layout file).
* :func:`write_vg_fixture`: Visual Genome ``region_descriptions.json`` + ``image_data.json`` + a densecap-style
  split file, images under ``VG_100K/`` and ``VG_100K_2/`` as the image zips unpack.
* :func:`write_pope_fixture`: POPE question files (JSON Lines, as RUCAIBox/POPE writes them) over COCO-named images.

Each returns the paths and the samples a reader must produce, so tests don't repeat the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fixtures_grounding import _draw

VG_URL = "https://cs.stanford.edu/people/rak248"


def write_vg_fixture(directory: str | Path) -> dict[str, Any]:
    """Three VG images (two in the ``test`` split), four regions in the test images.

    Returns:
        ``{"annotations", "image_data", "image_ids_file", "image_root", "test": [expected records]}``, an
        expected record being ``{"key", "file_name", "references", "box": [x1, y1, x2, y2]}``.
    """
    root = Path(directory)
    images = [  # (image_id, folder, (W, H), regions as (region_id, x, y, w, h, phrase))
        (1, "VG_100K_2", (80, 60), [(11, 5, 5, 30, 20, "a red sign on the wall"), (12, 40, 30, 30, 25, "green grass")]),
        (2, "VG_100K", (64, 64), [(21, 0, 0, 64, 32, "blue sky"), (22, 10, 40, 20, 20, "a small yellow box ")]),
        (3, "VG_100K", (50, 40), [(31, 1, 1, 10, 10, "not in the test split")]),
    ]
    for seed, (image_id, folder, size, regions) in enumerate(images):
        _draw(root / folder / f"{image_id}.jpg", size, [list(r[1:5]) for r in regions], seed)
    image_data = [{"width": size[0], "height": size[1], "url": f"{VG_URL}/{folder}/{image_id}.jpg",
                   "image_id": image_id, "coco_id": None, "flickr_id": None}
                  for image_id, folder, size, _ in images]
    descriptions = [{"id": image_id, "regions": [{"region_id": rid, "width": w, "height": h, "image_id": image_id,
                                                  "phrase": phrase, "y": y, "x": x}
                                                 for rid, x, y, w, h, phrase in regions]}
                    for image_id, _, _, regions in images]
    paths = {name: root / f"{name}.json" for name in ("region_descriptions", "image_data", "densecap_splits")}
    paths["region_descriptions"].write_text(json.dumps(descriptions), encoding="utf-8")
    paths["image_data"].write_text(json.dumps(image_data), encoding="utf-8")
    paths["densecap_splits"].write_text(json.dumps({"train": [3], "val": [], "test": [1, 2]}), encoding="utf-8")
    return {
        "annotations": str(paths["region_descriptions"]),
        "image_data": str(paths["image_data"]),
        "image_ids_file": str(paths["densecap_splits"]),
        "image_root": str(root),
        "test": [
            {"key": "11", "file_name": "VG_100K_2/1.jpg", "references": ["a red sign on the wall"],
             "box": [5, 5, 35, 25]},
            {"key": "12", "file_name": "VG_100K_2/1.jpg", "references": ["green grass"], "box": [40, 30, 70, 55]},
            {"key": "21", "file_name": "VG_100K/2.jpg", "references": ["blue sky"], "box": [0, 0, 64, 32]},
            {"key": "22", "file_name": "VG_100K/2.jpg", "references": ["a small yellow box"], "box": [10, 40, 30, 60]},
        ],
    }


def write_pope_fixture(directory: str | Path) -> dict[str, Any]:
    """Two COCO-named images and two POPE splits (``random``: 3 questions as JSON Lines, ``adversarial``: 2, as a
    JSON array, which some copies of POPE use).

    Returns:
        ``{"image_root", "question_files": {split: path}, "questions": {split: [(question_id, text, label)]}}``.
    """
    root = Path(directory)
    names = ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    for seed, name in enumerate(names):
        _draw(root / "images" / name, (48, 40), [[4, 4, 20, 20]], seed)
    questions = {
        "random": [(1, "Is there a dog in the image?", "yes"), (2, "Is there a car in the image?", "no"),
                   (3, "Is there a person in the image?", "no")],
        "adversarial": [(1, "Is there a dog in the image?", "yes"), (2, "Is there a cat in the image?", "no")],
    }
    files = {}
    for split, rows in questions.items():
        entries = [{"question_id": qid, "image": names[(qid - 1) % 2], "text": text, "label": label}
                   for qid, text, label in rows]
        path = root / f"coco_pope_{split}.json"
        if split == "random":
            path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        else:
            path.write_text(json.dumps(entries), encoding="utf-8")
        files[split] = str(path)
    return {"image_root": str(root / "images"), "question_files": files, "questions": questions}

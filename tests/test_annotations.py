"""Annotation reading (COCO / LVIS / Objects365 layout) and the SPR appendix §1 filters."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from spr_lightning.regions import filter_annotations, load_annotations, normalize_label


def coco(objects_per_image: dict[int, int], size: tuple[int, int] = (640, 480)) -> dict[str, Any]:
    """A COCO-layout dict: image ``i`` gets ``n`` 20x20 boxes in a row (area 400, above the 300 cut)."""
    images = [{"id": i, "file_name": f"img_{i}.jpg", "width": size[0], "height": size[1]} for i in objects_per_image]
    annotations = []
    for image_id, n in objects_per_image.items():
        for k in range(n):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": [25.0 * k, 10.0, 20.0, 20.0],
                    "category_id": 1 + k % 2,
                    "iscrowd": 0,
                    "area": 400.0,
                }
            )
    categories = [{"id": 1, "name": "Person"}, {"id": 2, "name": "baseball_bat"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write(tmp_path: Path, data: dict[str, Any], name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_reads_images_boxes_xywh_to_xyxy_and_labels(tmp_path: Path) -> None:
    data = coco({7: 2})
    data["annotations"][1]["bbox"] = [100.5, 50.0, 30.0, 40.25]
    index = load_annotations(write(tmp_path, data))
    assert len(index) == 1 and index.image_ids == [7]
    info = index.images[7]
    assert (info.id, info.file_name, info.width, info.height) == (7, "img_7.jpg", 640, 480)
    objs = index.objects(7)
    assert objs.boxes.dtype == torch.float64
    assert objs.boxes.tolist() == [[0.0, 10.0, 20.0, 30.0], [100.5, 50.0, 130.5, 90.25]]
    assert objs.labels == ["person", "baseball bat"]
    assert objs.annotation_ids == [1, 2] and objs.category_ids == [1, 2]
    assert objs.areas.tolist() == [400.0, 30.0 * 40.25]
    assert index.skipped == 0 and index.source == str(tmp_path / "ann.json")


def test_normalize_label() -> None:
    assert normalize_label("Other  Shoes") == "other shoes"
    assert normalize_label("bow_(weapon)") == "bow (weapon)"


def test_groups_interleaved_annotations_by_image_in_file_order(tmp_path: Path) -> None:
    data = coco({1: 3, 2: 3})
    data["annotations"] = [data["annotations"][i] for i in (3, 0, 4, 1, 5, 2)]
    index = load_annotations(write(tmp_path, data))
    assert index.objects(1).annotation_ids == [1, 2, 3]
    assert index.objects(2).annotation_ids == [4, 5, 6]
    assert index.num_objects(2) == 3 and index.num_annotations == 6


def test_lvis_file_name_from_coco_url_and_no_iscrowd(tmp_path: Path) -> None:
    data = coco({3: 2})
    del data["images"][0]["file_name"]
    data["images"][0]["coco_url"] = "http://images.cocodataset.org/val2017/000000000003.jpg"
    for ann in data["annotations"]:
        del ann["iscrowd"]
    index = load_annotations(write(tmp_path, data))
    assert index.images[3].file_name == "val2017/000000000003.jpg"
    assert index.objects(3).iscrowd.tolist() == [False, False]


def test_reads_gzip_and_dict_sources(tmp_path: Path) -> None:
    data = coco({1: 2})
    path = tmp_path / "ann.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    assert load_annotations(path).objects(1).boxes.shape == (2, 4)
    assert load_annotations(data, name="objects365_val").source == "objects365_val"


def test_index_is_built_once_and_needs_no_file_afterwards(tmp_path: Path) -> None:
    path = write(tmp_path, coco({1: 9, 2: 3}))
    index = load_annotations(path)
    path.unlink()
    assert index.objects(1).boxes.shape == (9, 4)
    assert filter_annotations(index).image_ids == [1]
    with pytest.raises(KeyError, match="no image with id 99"):
        index.objects(99)


def test_boxes_are_clipped_to_the_image_and_area_is_the_visible_part(tmp_path: Path) -> None:
    data = coco({1: 1}, size=(100, 80))
    data["annotations"][0]["bbox"] = [-10.0, 70.0, 50.0, 30.0]
    objs = load_annotations(write(tmp_path, data)).objects(1)
    assert objs.boxes.tolist() == [[0.0, 70.0, 40.0, 80.0]]
    assert objs.areas.tolist() == [400.0]


INVALID = [
    ("missing bbox", lambda a: a.pop("bbox"), "missing fields: ['bbox']"),
    ("NaN", lambda a: a.update(bbox=[1.0, math.nan, 5.0, 5.0]), "4 finite numbers"),
    ("short bbox", lambda a: a.update(bbox=[1.0, 2.0, 5.0]), "4 finite numbers"),
    ("negative w", lambda a: a.update(bbox=[1.0, 2.0, -5.0, 5.0]), "negative width/height"),
    ("negative h", lambda a: a.update(bbox=[1.0, 2.0, 5.0, -1.0]), "negative width/height"),
    ("unknown image", lambda a: a.update(image_id=12345), "unknown image id: 12345"),
    ("unknown category", lambda a: a.update(category_id=77), "unknown category id: 77"),
    ("string id", lambda a: a.update(id="x"), "id must be an integer"),
]


@pytest.mark.parametrize(("case", "mutate", "reason"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_annotation_raises_naming_file_and_id(tmp_path: Path, case: str, mutate: Any, reason: str) -> None:
    data = coco({1: 3})
    mutate(data["annotations"][1])
    path = write(tmp_path, data)
    ann_id = data["annotations"][1]["id"]
    with pytest.raises(ValueError) as err:
        load_annotations(path)
    message = str(err.value)
    assert str(path) in message and f"annotation id={ann_id!r}" in message and reason in message


def test_skip_mode_drops_and_counts_invalid_entries(tmp_path: Path) -> None:
    data = coco({1: 10, 2: 2})
    for ann, (_, mutate, _) in zip(data["annotations"], INVALID):
        mutate(ann)
    data["images"].append({"id": 3, "file_name": "x.jpg", "width": 0, "height": 10})
    index = load_annotations(write(tmp_path, data), on_error="skip")
    assert index.skipped == len(INVALID) + 1
    assert sum(index.skip_reasons.values()) == index.skipped
    assert index.skip_reasons["annotation: negative width/height in bbox"] == 2
    assert index.skip_reasons["annotation: unknown image id"] == 1
    assert index.skip_reasons["image: width/height must be positive integers"] == 1
    assert index.image_ids == [1, 2]
    assert index.objects(1).annotation_ids == [9, 10]
    assert index.objects(2).annotation_ids == [11, 12]


def test_invalid_images_and_files(tmp_path: Path) -> None:
    data = coco({1: 1})
    data["images"][0]["height"] = None
    with pytest.raises(ValueError, match=r"ann.json: invalid image id=1: width/height"):
        load_annotations(write(tmp_path, data))
    dup = coco({1: 1})
    dup["images"].append(dict(dup["images"][0]))
    with pytest.raises(ValueError, match="duplicate image id"):
        load_annotations(write(tmp_path, dup))
    with pytest.raises(ValueError, match=r"bad.json: not a COCO-layout file.*'categories'"):
        load_annotations(write(tmp_path, {"images": [], "annotations": []}, "bad.json"))
    nameless = coco({1: 1})
    nameless["categories"][0] = {"id": 1}
    with pytest.raises(ValueError, match=r"invalid category id=1: needs an integer id and a string name"):
        load_annotations(write(tmp_path, nameless))
    assert load_annotations(nameless, on_error="skip").skip_reasons == {
        "category: needs an integer id and a string name": 1,
        "annotation: unknown category id": 1,
    }
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_annotations(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="on_error"):
        load_annotations(coco({1: 1}), on_error="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- SPR appendix §1 filters


def test_area_below_300_is_removed_and_300_kept(tmp_path: Path) -> None:
    """Appendix: "removed small objects with an area of less than 300"; box area w*h, not COCO's mask ``area``."""
    data = coco({1: 11})
    data["annotations"][0]["bbox"] = [0.0, 0.0, 20.0, 15.0]  # 300: kept
    data["annotations"][1]["bbox"] = [0.0, 0.0, 20.0, 14.95]  # 299: removed
    data["annotations"][2]["area"] = 10.0  # box is 20x20 = 400: kept despite a small mask area
    index = filter_annotations(load_annotations(write(tmp_path, data)), min_objects=0)
    assert index.objects(1).annotation_ids == [1, *range(3, 12)]


@pytest.mark.parametrize(("n", "kept"), [(8, False), (9, True)])
def test_images_need_strictly_more_than_eight_objects(tmp_path: Path, n: int, kept: bool) -> None:
    """Appendix: images "containing more than eight objects"."""
    index = filter_annotations(load_annotations(write(tmp_path, coco({1: n}))))
    assert (1 in index) is kept


def test_object_count_is_taken_after_dropping_small_objects(tmp_path: Path) -> None:
    data = coco({1: 9, 2: 9})
    data["annotations"][0]["bbox"] = [0.0, 0.0, 10.0, 10.0]
    index = filter_annotations(load_annotations(write(tmp_path, data)))
    assert index.image_ids == [2] and index.num_objects(2) == 9


def test_crowd_objects_dropped_by_default_before_counting(tmp_path: Path) -> None:
    """Appendix re-annotates "crowd" objects with GroundingDINO; we drop them (option) before the >8 count."""
    data = coco({1: 9, 2: 10})
    data["annotations"][0]["iscrowd"] = 1
    data["annotations"][9]["iscrowd"] = 1
    loaded = load_annotations(write(tmp_path, data))
    default = filter_annotations(loaded)
    assert default.image_ids == [2] and default.num_objects(2) == 9
    assert 10 not in default.objects(2).annotation_ids
    kept = filter_annotations(loaded, drop_crowd=False)
    assert kept.image_ids == [1, 2] and kept.objects(2).iscrowd.sum().item() == 1
    assert filter_annotations(loaded, drop_crowd_images=True).image_ids == []


def test_subset_keeps_objects_and_rejects_unknown_ids(tmp_path: Path) -> None:
    index = load_annotations(write(tmp_path, coco({1: 2, 2: 3, 3: 4})))
    sub = index.subset([3, 1])
    assert sub.image_ids == [1, 3]  # index order is kept
    assert sub.objects(3).annotation_ids == index.objects(3).annotation_ids
    with pytest.raises(KeyError):
        index.subset([9])

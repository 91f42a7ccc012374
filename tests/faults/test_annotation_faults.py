"""Bad annotation files: each fault raises naming the file and the entry, or with ``on_error="skip"`` is
dropped, counted, and reported in the generation stage's logs (``docs/reliability.md``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fixtures_coco import write_coco_fixture

from datamodules.regions import RegionQueryDataModule
from spr_lightning.regions import filter_annotations, load_annotations


def _coco(tmp_path: Path) -> dict:
    fixture = write_coco_fixture(tmp_path / "coco", num_images=2, seed=3)
    return json.loads(fixture.annotations.read_text())


def _write(tmp_path: Path, data: dict | str, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _first_ann(data: dict) -> dict:
    return data["annotations"][0]


# (case, how to damage the first annotation / the file, text the error must carry)
ANNOTATION_FAULTS = [
    ("missing_bbox", lambda d: _first_ann(d).pop("bbox"), "missing fields"),
    ("missing_image_id", lambda d: _first_ann(d).pop("image_id"), "missing fields"),
    ("x2_before_x1", lambda d: _first_ann(d).update(bbox=[50, 10, -20, 30]), "negative width/height"),
    ("nan_box", lambda d: _first_ann(d).update(bbox=[float("nan"), 10, 20, 30]), "finite numbers"),
    ("infinite_box", lambda d: _first_ann(d).update(bbox=[1, 10, float("inf"), 30]), "finite numbers"),
    ("string_box", lambda d: _first_ann(d).update(bbox=["1", 10, 20, 30]), "finite numbers"),
    ("three_numbers", lambda d: _first_ann(d).update(bbox=[1, 10, 20]), "finite numbers"),
    ("unknown_image_id", lambda d: _first_ann(d).update(image_id=999999), "unknown image id"),
    ("unknown_category", lambda d: _first_ann(d).update(category_id=77), "unknown category id"),
    ("duplicate_annotation_id", lambda d: d["annotations"].append(dict(_first_ann(d))), "duplicate annotation id"),
]


@pytest.mark.parametrize(("case", "damage", "reason"), ANNOTATION_FAULTS, ids=[c[0] for c in ANNOTATION_FAULTS])
def test_bad_annotation_raises_naming_file_and_id_or_is_skipped_and_counted(tmp_path, case, damage, reason):
    data = _coco(tmp_path)
    good = len(data["annotations"])
    damage(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"bad\.json: invalid annotation id=1\b.*{reason}"):
        load_annotations(path)
    index = load_annotations(path, on_error="skip")
    assert index.skipped == 1 and sum(index.skip_reasons.values()) == 1
    assert reason in next(iter(index.skip_reasons))
    kept = good - (case != "duplicate_annotation_id")  # the duplicate is the extra copy; the original stays
    assert index.num_annotations == kept


def test_duplicate_image_id_raises_or_is_skipped(tmp_path):
    data = _coco(tmp_path)
    data["images"].append(dict(data["images"][0], file_name="other.png"))
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"invalid image id=1000: duplicate image id"):
        load_annotations(path)
    index = load_annotations(path, on_error="skip")
    assert index.skip_reasons == {"image: duplicate image id": 1}
    assert index.images[1000].file_name != "other.png"  # the first entry wins, the copy is counted


@pytest.mark.parametrize("content", ["", "   \n", "{\"images\": ["], ids=["empty", "blank", "cut"])
def test_empty_or_cut_file_is_a_clear_error(tmp_path, content):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_annotations(path, on_error="skip")  # nothing to skip: the whole file is unusable


def test_file_without_the_coco_lists_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.json: not a COCO-layout file.*annotations"):
        load_annotations(_write(tmp_path, {"images": [], "categories": []}))


def test_boxes_outside_the_image_are_clipped_and_zero_area_objects_never_survive(tmp_path):
    data = _coco(tmp_path)
    width, height = data["images"][0]["width"], data["images"][0]["height"]
    image_id = data["images"][0]["id"]
    extra = [
        {"bbox": [-10, -10, 30, 30]},  # overhangs the top-left corner: clipped to [0, 0, 20, 20]
        {"bbox": [width + 5, 0, 10, 10]},  # wholly outside: clipped to zero area
        {"bbox": [10, 10, 0, 40]},  # zero width
        {"bbox": [-3, 5, 1, 1]},  # negative x, but w, h >= 0 and wholly outside
    ]
    for i, ann in enumerate(extra):
        data["annotations"].append({"id": 10_000 + i, "image_id": image_id, "category_id": 1, "iscrowd": 0, **ann})
    index = load_annotations(_write(tmp_path, data))  # none of these is an error: they are clipped
    objects = index.objects(image_id)
    row = objects.annotation_ids.index(10_000)
    assert objects.boxes[row].tolist() == [0.0, 0.0, 20.0, 20.0] and objects.areas[row].item() == 400.0
    assert (objects.boxes[:, 0::2] <= width).all() and (objects.boxes[:, 1::2] <= height).all()
    assert (objects.boxes >= 0).all()
    for min_area in (0.0, 300.0):  # zero-area boxes are dropped even when the area filter is off
        kept = filter_annotations(index, min_object_area=min_area, min_objects=0).objects(image_id)
        assert {10_001, 10_002, 10_003}.isdisjoint(kept.annotation_ids)
        assert (kept.areas > 0).all()
    assert 10_000 in filter_annotations(index, min_object_area=0.0, min_objects=0).objects(image_id).annotation_ids


def test_generation_data_module_logs_skipped_entries_and_refuses_an_empty_run(tmp_path, caplog):
    fixture = write_coco_fixture(tmp_path / "coco", num_images=2, seed=3, objects_per_image=(11, 12))
    data = json.loads(fixture.annotations.read_text())
    data["annotations"][0]["bbox"] = [1, 2, -3, 4]
    data["annotations"][1]["image_id"] = 4242
    path = _write(tmp_path, data)
    module = RegionQueryDataModule(str(path), str(fixture.image_root), "ferret", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="datamodules.regions"):
        module.setup("predict")
    assert module.skipped_annotations == 2
    assert "skipped 2 invalid entries" in caplog.text and "unknown image id" in caplog.text
    assert len(module.specs) == 2  # both images keep more than eight objects

    # A file whose images are all filtered out (or that holds none) would "succeed" writing nothing.
    data["images"], data["annotations"] = [], []
    empty = RegionQueryDataModule(str(_write(tmp_path, data, "empty.json")), str(fixture.image_root), "ferret")
    with pytest.raises(ValueError, match=r"empty\.json: no region queries: 0 images"):
        empty.setup("predict")

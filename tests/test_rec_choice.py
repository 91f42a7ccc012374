"""rec_choice: which object a REC answer picks, against hand-worked cases, and the CLI on files."""

import json

import pytest

from spr_lightning.experiments.rec_choice import main, rec_choice

OBJECTS = {1: [
    {"id": 100, "box": [0, 0, 10, 10], "attributes": {"size": "small", "color": "red", "shape": "circle"}},
    {"id": 101, "box": [20, 0, 40, 20], "attributes": {"size": "large", "color": "red", "shape": "square"}},
    {"id": 102, "box": [0, 20, 10, 30], "attributes": {"size": "small", "color": "blue", "shape": "circle"}},
]}
REFS = {"1": {"id": 1, "image_id": 1, "ann_id": 100, "kinds": ["attribute", "relation"]},
        "2": {"id": 2, "image_id": 1, "ann_id": 102, "kinds": ["attribute"]}}
PREDICTIONS = [
    {"key": "1-0", "pred_box": [0, 0, 10, 10]},  # on the target: right, every attribute agrees
    {"key": "1-1", "pred_box": [21, 1, 40, 20]},  # on the large red square: colour agrees, size and shape do not
    {"key": "2-0", "pred_box": [50, 50, 60, 60]},  # on nothing
    {"key": "2-0", "pred_box": None},  # unparsed: counts as a miss
]


def test_rec_choice_by_hand():
    result = rec_choice(PREDICTIONS, REFS, OBJECTS)
    everything = result["all"]
    assert everything["n"] == 4 and everything["on_object"] == 0.5 and everything["right"] == 0.25
    assert (everything["size"], everything["color"], everything["shape"]) == (0.5, 1.0, 0.5)
    # Both on-object picks refer to the small red circle: 2 of the 3 objects share each of its values.
    assert everything["size_chance"] == everything["color_chance"] == everything["shape_chance"] == pytest.approx(2 / 3)
    assert result["relation"]["n"] == 1 and result["relation"]["right"] == 0.0 and result["relation"]["color"] == 1.0
    attribute = result["attribute"]
    assert attribute["n"] == 3 and attribute["on_object"] == pytest.approx(1 / 3) and attribute["size"] == 1.0


def test_unknown_ref_is_named():
    with pytest.raises(KeyError, match="9-0"):
        rec_choice([{"key": "9-0", "pred_box": [0, 0, 1, 1]}], REFS, OBJECTS)


def test_cli_reads_world_files_and_writes_json(tmp_path, capsys):
    refs = tmp_path / "refcoco_shapes.json"
    refs.write_text(json.dumps(list(REFS.values())))
    instances = tmp_path / "instances_test.json"
    annotations = [{"id": o["id"], "image_id": 1, "bbox": [o["box"][0], o["box"][1], o["box"][2] - o["box"][0],
                                                          o["box"][3] - o["box"][1]], "attributes": o["attributes"]}
                   for o in OBJECTS[1]]
    instances.write_text(json.dumps({"images": [{"id": 1}], "annotations": annotations, "categories": []}))
    predictions = tmp_path / "predictions-rank0.jsonl"
    predictions.write_text("".join(json.dumps(p) + "\n" for p in PREDICTIONS))
    out = tmp_path / "choice.json"
    main([str(predictions), str(refs), str(instances), "--out", str(out)])
    assert json.loads(out.read_text())["all"]["right"] == 0.25
    assert "relation" in capsys.readouterr().out

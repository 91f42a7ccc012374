"""description_quality: held-out region descriptions against the annotations, on hand-worked answers."""

from __future__ import annotations

import json
import math

import pytest
from test_pair_quality import NOWHERE, RED_ON_BLUE, RED_RIGHT, _annotations
from test_reward_audit import _candidates

from spr_lightning.experiments.description_quality import DESCRIPTION_METRICS, description_quality, main
from spr_lightning.shards import ShardFormatError


def test_first_candidate_scored_against_the_annotations(tmp_path):
    # the first answer: red circle right (on object, named, IoU 1, names the region) + a box on nothing
    text = f"{RED_RIGHT}, {NOWHERE}"
    candidates = _candidates(tmp_path / "c", texts=[text, RED_ON_BLUE])
    summary = description_quality(candidates, _annotations(tmp_path / "ann.json"))
    assert summary["regions"] == 1 and summary["boxes"] == 2
    assert summary["on_object"] == pytest.approx(0.5) and summary["named"] == pytest.approx(0.5)
    assert summary["mean_iou"] == pytest.approx(0.5)  # 1.0 and 0.0
    # "a large blue square" is not an object of the queried region (only the small red circle is)
    assert summary["names_region"] == pytest.approx(0.5)


def test_a_box_on_the_wrong_object_is_on_object_but_not_named(tmp_path):
    summary = description_quality(_candidates(tmp_path / "c", texts=[RED_ON_BLUE]), _annotations(tmp_path / "a.json"))
    assert summary["on_object"] == 1.0 and summary["named"] == 0.0 and summary["names_region"] == 1.0


def test_errors_name_the_query(tmp_path):
    annotations = _annotations(tmp_path / "a.json")
    with pytest.raises(ShardFormatError, match="'1-0' has no candidate"):
        description_quality(_candidates(tmp_path / "empty", texts=[]), annotations)
    data = json.loads(annotations.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="query '1-0': image 1 is not in"):
        description_quality(_candidates(tmp_path / "c", texts=[RED_RIGHT]), other)


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "q.json"
    summary = main([str(_candidates(tmp_path / "c", texts=[RED_RIGHT])), str(_annotations(tmp_path / "a.json")),
                    "--out", str(out)])
    assert json.loads(out.read_text()) == summary and "on_object: 1.000" in capsys.readouterr().out
    assert set(DESCRIPTION_METRICS) < set(summary) and not any(math.isnan(v) for v in summary.values())

"""oracle_pairs: descriptions ranked by the annotations, on hand-worked candidates; shards DPO's schema accepts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from test_pair_quality import NOWHERE, OBJECTS, RED_ON_BLUE, RED_RIGHT, SIZE, _annotations

from spr_lightning.experiments.oracle_pairs import build_oracle_pairs, main, oracle_pair, oracle_scores
from spr_lightning.experiments.pair_quality import iter_records
from spr_lightning.shards import ShardFormatError, validate_record


def _record(texts: list[str], image_id: int = 1, query_id: str = "1-0") -> dict:
    return {"schema": 1, "query_id": query_id, "image_id": image_id, "image_size": list(SIZE), "region": [0, 0, 50, 50],
            "prompt": "Describe the region.", "candidates": texts, "coord_format": "minigpt_v2"}


def _candidates(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path / "candidates-r000-000000.tar", "w") as tar:
        for record in records:
            for name, payload in ((f"{record['query_id']}.json", json.dumps(record).encode()),
                                  (f"{record['query_id']}.jpg", b"jpeg bytes")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_scores_are_named_right_share_with_an_iou_tie_break():
    scores = oracle_scores(_record([RED_RIGHT, RED_ON_BLUE, NOWHERE]), OBJECTS)
    assert scores[0] == pytest.approx(1.0 + 1e-3)  # named right, IoU 1
    assert scores[1] == pytest.approx(1e-3) and scores[2] == 0.0  # exactly on the wrong object / on nothing
    assert oracle_pair(_record([RED_ON_BLUE, RED_RIGHT, NOWHERE]), OBJECTS)[:2] == (1, 2)
    assert oracle_pair(_record([NOWHERE, NOWHERE]), OBJECTS) is None


def test_build_writes_on_policy_pairs_and_skips_ties(tmp_path):
    records = [_record([NOWHERE, RED_RIGHT]), _record([NOWHERE, NOWHERE], query_id="1-1")]
    candidates = _candidates(tmp_path / "c", records)
    summary = build_oracle_pairs(candidates, _annotations(tmp_path / "a.json"), tmp_path / "pairs")
    assert summary["queries"] == 2 and summary["pairs"] == 1 and summary["ties"] == 1
    assert summary["chosen_oracle"] == pytest.approx(1.0 + 1e-3) and summary["rejected_oracle"] == 0.0
    [(_, key, record)] = list(iter_records(tmp_path / "pairs", "pair"))
    validate_record("pairs", record)
    assert key == "1-0" and record["chosen"] == RED_RIGHT == record["chosen_raw"] and record["rejected"] == NOWHERE
    assert json.loads((tmp_path / "pairs" / "summary.json").read_text()) == summary


def test_refine_snaps_the_chosen_boxes_to_the_annotations(tmp_path):
    # a red circle written slightly off: named right (IoU >= 0.5) and snapped to the annotated box by refinement
    near = "<p>a small red circle</p> {<1><0><10><20>}"
    candidates = _candidates(tmp_path / "c", [_record([near, NOWHERE])])
    main([str(candidates), str(_annotations(tmp_path / "a.json")), str(tmp_path / "pairs"), "--refine"])
    [(_, _, record)] = list(iter_records(tmp_path / "pairs", "pair"))
    assert record["chosen_raw"] == near and record["chosen"] == RED_RIGHT


def test_an_image_missing_from_the_annotations_is_named(tmp_path):
    candidates = _candidates(tmp_path / "c", [_record([RED_RIGHT, NOWHERE], image_id=7, query_id="7-0")])
    with pytest.raises(ShardFormatError, match="'7-0': image 7 is not in"):
        build_oracle_pairs(candidates, _annotations(tmp_path / "a.json"), tmp_path / "pairs")

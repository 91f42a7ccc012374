"""pair_quality: chosen vs rejected answers checked against annotations, on hand-worked pairs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from spr_lightning.experiments.pair_quality import answer_quality, format_quality, main, pair_quality

# image 1 (200 x 100): a red circle at x 0-20 and a blue square at x 100-140.
OBJECTS = [("small red circle", [0.0, 0.0, 20.0, 20.0]), ("large blue square", [100.0, 0.0, 140.0, 40.0])]
SIZE = (200, 100)
# minigpt_v2 bins: x/200*100, y/100*100, decoded back as bin/100*size.
RED_RIGHT = "<p>a small red circle</p> {<0><0><10><20>}"  # exactly the red circle's box
RED_ON_BLUE = "<p>a small red circle</p> {<50><0><70><40>}"  # on the blue square, named wrong
NOWHERE = "<p>a large blue square</p> {<80><60><90><90>}"  # on no object


def _annotations(path: Path) -> Path:
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
            "categories": [{"id": 1, "name": "small red circle"}, {"id": 2, "name": "large blue square"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 0, 40, 40]}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _shard(path: Path, pairs: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path / "pairs-000000.tar", "w") as tar:
        for k, pair in enumerate(pairs):
            for name, payload in ((f"{k}.json", json.dumps(pair).encode()), (f"{k}.jpg", b"not read")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _pair(chosen: str, rejected: str, chosen_raw: str | None = None, image_id: int = 1) -> dict:
    return {"query_id": f"{image_id}-0", "image_id": image_id, "image_size": list(SIZE), "chosen": chosen,
            "rejected": rejected, "chosen_raw": chosen_raw or chosen}


def test_answer_quality_counts_boxes_on_objects_and_named_right() -> None:
    right = answer_quality(RED_RIGHT, OBJECTS, SIZE)
    assert (right.boxes, right.on_object, right.named) == (1, 1.0, 1.0)
    assert right.mean_iou == pytest.approx(1.0)
    wrong_name = answer_quality(RED_ON_BLUE, OBJECTS, SIZE)
    assert (wrong_name.on_object, wrong_name.named) == (1.0, 0.0)
    both = answer_quality(f"{RED_RIGHT} and {NOWHERE}", OBJECTS, SIZE)
    assert (both.boxes, both.on_object, both.named) == (2, 0.5, 0.5)
    assert both.mean_iou == pytest.approx(0.5)  # 1.0 and 0.0
    assert answer_quality("no boxes here", OBJECTS, SIZE) == answer_quality("", OBJECTS, SIZE)


def test_pair_quality_shares_over_pairs(tmp_path: Path) -> None:
    _shard(tmp_path / "pairs", [_pair(RED_RIGHT, RED_ON_BLUE, chosen_raw=NOWHERE),
                                _pair(RED_ON_BLUE, RED_RIGHT), _pair(NOWHERE, NOWHERE)])
    summary = pair_quality(tmp_path / "pairs", _annotations(tmp_path / "ann.json"))
    assert summary["pairs"] == 3
    assert summary["chosen_named"] == pytest.approx(1 / 3)
    assert summary["chosen_raw_named"] == pytest.approx(0.0)
    assert summary["rejected_on_object"] == pytest.approx(2 / 3)
    assert summary["chosen_better"] == pytest.approx(1 / 3)
    assert summary["chosen_worse"] == pytest.approx(1 / 3)
    assert "3 pairs" in format_quality(summary)


def test_cli_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _shard(tmp_path / "pairs", [_pair(RED_RIGHT, NOWHERE)])
    main([str(tmp_path / "pairs"), str(_annotations(tmp_path / "ann.json"))])
    out = capsys.readouterr().out
    assert "| chosen | 1.00 | 100.0% | 100.0% |" in out


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    ann = _annotations(tmp_path / "ann.json")
    with pytest.raises(FileNotFoundError, match="no \\*.tar pair shards"):
        pair_quality(tmp_path, ann)
    _shard(tmp_path / "pairs", [_pair(RED_RIGHT, NOWHERE, image_id=7)])
    with pytest.raises(KeyError, match="image_id 7"):
        pair_quality(tmp_path / "pairs", ann)

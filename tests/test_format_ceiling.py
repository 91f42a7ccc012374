"""The format ceiling: ground-truth boxes written in the answer format and read back, checked by hand."""

import json

import pytest

from spr_lightning.experiments.format_ceiling import format_ceiling, main, read_predictions, written_box_iou

SIZE = (224, 224)  # MiniGPT-v2's grid step is 2.24 px here


def test_a_box_on_the_grid_is_written_exactly():
    assert written_box_iou([0.0, 0.0, 22.4, 22.4], SIZE) == pytest.approx(1.0)


def test_a_box_off_the_grid_loses_iou_by_hand():
    # x1 = 1 px rounds to bin 0 (0 px), x2 = 23.4 px to bin 10 (22.4 px): 21.4 px of 23.4 px overlap in x, y exact.
    assert written_box_iou([1.0, 0.0, 23.4, 22.4], SIZE) == pytest.approx(21.4 / 23.4, abs=1e-9)


def test_rec_and_phrase_rows_and_thresholds():
    rows = [
        {"key": "a", "image_size": list(SIZE), "gt_box": [0.0, 0.0, 22.4, 22.4]},  # IoU 1
        {"key": "b", "image_size": list(SIZE), "gt_box": [1.0, 0.0, 23.4, 22.4]},  # IoU 0.9145
        # one phrase, two boxes: MERGED-BOXES scores their enclosing box [0, 0, 44.8, 44.8], on the grid
        {"key": "c", "image_size": list(SIZE), "gt_boxes": [[[0.0, 0.0, 22.4, 22.4], [22.4, 22.4, 44.8, 44.8]]]},
    ]
    result = format_ceiling(rows, thresholds=(0.9, 0.95))
    assert result["n"] == 3
    assert result["@0.9"] == pytest.approx(1.0)
    assert result["@0.95"] == pytest.approx(2 / 3)
    assert result["mean_iou"] == pytest.approx((2 + 21.4 / 23.4) / 3)


def test_rows_without_targets_and_bad_lines_are_named(tmp_path):
    with pytest.raises(ValueError, match="'x'.*neither"):
        format_ceiling([{"key": "x", "image_size": [10, 10]}])
    with pytest.raises(ValueError, match="empty"):
        format_ceiling([])
    path = tmp_path / "predictions-rank0.jsonl"
    path.write_text('{"key": "a", "image_size": [224, 224], "gt_box": [0, 0, 22.4, 22.4]}\nnot json\n')
    with pytest.raises(ValueError, match=r"predictions-rank0.jsonl:2: not JSON"):
        read_predictions(path)


def test_command_line_writes_the_result(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"key": "b", "image_size": [224, 224], "gt_box": [1.0, 0.0, 23.4, 22.4]}) + "\n")
    out = tmp_path / "ceiling.json"
    main([str(path), "--out", str(out)])
    assert json.loads(out.read_text())["@0.9"] == 1.0
    assert "1 targets written in minigpt_v2" in capsys.readouterr().out

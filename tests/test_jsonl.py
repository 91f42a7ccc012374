import pytest

from spr_lightning.jsonl import parse_json_lines, read_json_lines


def test_reads_one_value_per_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[2, 3]\n', encoding="utf-8")
    assert read_json_lines(path) == [{"a": 1}, [2, 3]]


def test_a_bad_line_is_named_by_source_and_number():
    with pytest.raises(ValueError, match=r"questions.jsonl:3: not JSON"):
        parse_json_lines('{"a": 1}\n{"b": 2}\n{"c": \n', "questions.jsonl")

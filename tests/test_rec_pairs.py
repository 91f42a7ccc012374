"""``experiments.rec_pairs`` (the REC-answer control): IoU and pair choice by hand, question reading, and a run on a
tiny policy that writes pair shards DPO's reader accepts."""

from __future__ import annotations

import json
import math

import pytest
from torchvision.ops import box_iou

from spr_lightning.experiments.rec_pairs import answer_iou, choose_pair, read_rec_questions


def test_iou_by_hand_against_torchvision():
    import torch

    cases = [((5.0, 0.0, 15.0, 10.0), [0.0, 0.0, 10.0, 10.0], 1 / 3), ((0.0, 0.0, 10.0, 10.0), [0, 0, 10, 10], 1.0),
             ((20.0, 20.0, 30.0, 30.0), [0.0, 0.0, 10.0, 10.0], 0.0)]
    for box, target, expected in cases:
        assert answer_iou(box, target) == pytest.approx(expected)
        reference = float(box_iou(torch.tensor([box]), torch.tensor([target], dtype=torch.float32))[0, 0])
        assert answer_iou(box, target) == pytest.approx(reference)
    assert answer_iou((math.nan,) * 4, [0.0, 0.0, 10.0, 10.0]) == 0.0


def test_best_paired_with_worst():
    assert choose_pair(["a", "b", "c"], [0.4, 0.9, 0.1], "gt", "best", 0.1) == ("b", 0.9, "c", 0.1)


def test_precision_pairs_reject_the_worst_answer_on_the_named_object():
    texts, ious = ["a", "b", "c", "d"], [0.55, 0.9, 0.1, 0.7]
    assert choose_pair(texts, ious, "gt", "best", 0.1, rejected_min_iou=0.5) == ("b", 0.9, "a", 0.55)
    assert choose_pair(texts, ious, "gt", "best", 0.1) == ("b", 0.9, "c", 0.1)  # default: the worst of all
    assert choose_pair(texts, ious, "gt", "best", 0.4, rejected_min_iou=0.5) is None  # gap 0.35 < 0.4
    assert choose_pair(["a", "b"], [0.3, 0.1], "gt", "best", 0.1, rejected_min_iou=0.5) is None  # none on target


def test_refined_snaps_only_above_half_and_truth_always():
    assert choose_pair(["a", "b"], [0.6, 0.0], "gt", "refined", 0.1) == ("gt", 1.0, "b", 0.0)
    assert choose_pair(["a", "b"], [0.4, 0.0], "gt", "refined", 0.1) == ("a", 0.4, "b", 0.0)
    assert choose_pair(["a", "b"], [0.1, 0.0], "gt", "truth", 0.1) == ("gt", 1.0, "b", 0.0)
    with pytest.raises(ValueError, match="chosen_mode"):
        choose_pair(["a"], [0.1], "gt", "oracle", 0.1)


@pytest.mark.parametrize(("texts", "ious"), [
    (["a", "a"], [0.9, 0.2]),   # equal sides
    (["a", "b"], [0.55, 0.5]),  # gap under min_gap
    ([" ", "b"], [0.9, 0.0]),   # blank preferred answer
])
def test_pairs_that_teach_nothing_are_dropped(texts, ious):
    assert choose_pair(texts, ious, "gt", "best", 0.1) is None


def test_read_rec_questions_keeps_rec_rows_and_names_bad_lines(tmp_path):
    good = {"id": "1-0", "image": "i.jpg", "image_size": [8, 8], "prompt": "p", "answer": "a", "boxes": [[0, 0, 1, 1]],
            "task": "rec"}
    path = tmp_path / "sft_train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "task": "phrase"}) + "\n\n")
    assert [r["id"] for r in read_rec_questions(path)] == ["1-0"]
    path.write_text(json.dumps({**good, "boxes": []}) + "\n")
    with pytest.raises(ValueError, match=r"sft_train.jsonl:1: REC row '1-0' lacks"):
        read_rec_questions(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"sft_train.jsonl:1: not JSON"):
        read_rec_questions(path)
    path.write_text(json.dumps({**good, "task": "phrase"}) + "\n")
    with pytest.raises(ValueError, match="no REC question"):
        read_rec_questions(path)


def test_build_rec_pairs_writes_shards_dpo_reads(tmp_path, monkeypatch):
    """The policy is replaced by fixed answers (one exact, one elsewhere, one unreadable): the pair is exact vs the
    worst, its shard passes the pairs schema DPO checks, and the summary counts it."""
    from PIL import Image

    from spr_lightning.coords import get_codec
    from spr_lightning.experiments import rec_pairs
    from spr_lightning.experiments.pair_quality import iter_records
    from spr_lightning.generation import CandidateGenerator
    from spr_lightning.shards import validate_record

    codec, size = get_codec("minigpt_v2"), (100, 100)
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
        box = [10.0 * i, 10.0, 10.0 * i + 30.0, 40.0]
        rows.append({"id": f"{i}-0", "image": f"images/{i}.jpg", "image_size": list(size), "task": "rec",
                     "prompt": f"Give the bounding box of thing {i}.", "answer": codec.encode(box, size),
                     "boxes": [box]})
    (tmp_path / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    truth = {r["prompt"]: r["answer"] for r in rows}

    def fake_generate(self, prompts, images, frame_sizes):
        return [[truth[p], codec.encode([60.0, 60.0, 90.0, 90.0], size), "no box"] for p in prompts]

    monkeypatch.setattr(CandidateGenerator, "configure_model", lambda self: None)
    monkeypatch.setattr(CandidateGenerator, "generate", fake_generate)
    out = tmp_path / "pairs"
    summary = rec_pairs.build_rec_pairs("unused", tmp_path, out, queries=2, candidates=3, batch_size=2,
                                        progress=False)
    assert summary["queries"] == 2 and summary["pairs"] == 2 and summary["dropped"] == 0
    assert summary["best_of_k_acc"]["0.9"] == 1.0 and summary["sampled_acc"]["0.5"] == pytest.approx(1 / 3)
    assert summary["chosen_iou_mean"] == pytest.approx(1.0) and summary["rejected_iou_mean"] == 0.0
    records = [validate_record("pairs", r) for _, _, r in iter_records(out, "pair")]
    assert len(records) == 2
    for record in records:
        assert record["chosen"] == truth[record["prompt"]] and record["scores"]["rejected"]["iou"] == 0.0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_answer_rec_questions_names_a_question_whose_image_is_missing(tmp_path):
    from spr_lightning.experiments.rec_pairs import answer_rec_questions

    class NoGenerator:  # never reached: the missing image is found first
        def generate(self, prompts, images, sizes):
            raise AssertionError("generate called")

    rows = [{"id": "7-0", "image": "images/7.jpg", "image_size": [8, 8], "prompt": "p"}]
    with pytest.raises(FileNotFoundError, match=r"REC question '7-0': no image .*images/7\.jpg"):
        list(answer_rec_questions(NoGenerator(), rows, tmp_path, progress=False))

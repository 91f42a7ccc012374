"""The REC-pairs probe (docs/results/probes/rec_pairs.py): its IoU and its choice of pair, against hand cases."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "docs" / "results" / "probes" / "rec_pairs.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("_probe_rec_pairs", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iou_by_hand_and_unreadable_answer(probe):
    # 10x10 box shifted by 5 in x: overlap 50, union 150.
    assert probe.iou((5.0, 0.0, 15.0, 10.0), [0.0, 0.0, 10.0, 10.0]) == pytest.approx(1 / 3)
    assert probe.iou((0.0, 0.0, 10.0, 10.0), [0.0, 0.0, 10.0, 10.0]) == pytest.approx(1.0)
    assert probe.iou((math.nan,) * 4, [0.0, 0.0, 10.0, 10.0]) == 0.0


def test_best_paired_with_worst(probe):
    texts, ious = ["a", "b", "c"], [0.4, 0.9, 0.1]
    assert probe.choose_pair(texts, ious, "truth", "best", 0.1) == ("b", 0.9, "c", 0.1)


def test_refined_snaps_only_above_half(probe):
    assert probe.choose_pair(["a", "b"], [0.6, 0.0], "gt", "refined", 0.1) == ("gt", 1.0, "b", 0.0)
    assert probe.choose_pair(["a", "b"], [0.4, 0.0], "gt", "refined", 0.1) == ("a", 0.4, "b", 0.0)
    assert probe.choose_pair(["a", "b"], [0.1, 0.0], "gt", "truth", 0.1) == ("gt", 1.0, "b", 0.0)


@pytest.mark.parametrize(("texts", "ious"), [
    (["a", "a"], [0.9, 0.2]),   # equal sides after all
    (["a", "b"], [0.55, 0.5]),  # gap under min_gap
    ([" ", "b"], [0.9, 0.0]),   # blank preferred answer
])
def test_pairs_that_teach_nothing_are_dropped(probe, texts, ious):
    assert probe.choose_pair(texts, ious, "gt", "best", 0.1) is None

"""Grounding metrics on hand-worked cases: >= vs >, unreadable answers, merged vs any ground truth, skipped
phrases, k > 1, per-type breakdown, empty batches, functional twins and state accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from spr_lightning.metrics import AccuracyAtIoU, PhraseGroundingRecall, accuracy_at_iou, phrase_grounding_recall
from spr_lightning.metrics.accuracy import paired_iou

NAN = float("nan")
T = torch.tensor


def test_paired_iou_matches_torchvision_diagonal():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 4, generator=g) * 50
    b = torch.rand(16, 4, generator=g) * 50
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    assert torch.allclose(paired_iou(a, b), tv_box_iou(a, b).diagonal(), atol=1e-6)


def test_accuracy_inclusive_vs_strict_at_exact_threshold():
    # IoU of [0,0,2,1] with [0,0,1,1] is exactly 1/2; [0,0,1,1] with itself is 1; disjoint boxes give 0
    preds = T([[0.0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]])
    target = T([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    inclusive = AccuracyAtIoU(thresholds=(0.5, 0.9))
    inclusive.update(preds, target)
    out = inclusive.compute()
    assert out["acc@0.5"].item() == pytest.approx(2 / 3)  # Ferret / Qwen-VL / lmms-eval count IoU >= 0.5
    assert out["acc@0.9"].item() == pytest.approx(1 / 3)
    strict = accuracy_at_iou(preds, target, thresholds=(0.5,), inclusive=False)
    assert strict["acc@0.5"].item() == pytest.approx(1 / 3)  # Shikra / MiniGPT-v2 count IoU > 0.5


def test_accuracy_nan_rows_are_misses_in_the_denominator():
    preds = T([[0.0, 0, 10, 10], [NAN, NAN, NAN, NAN], [0, NAN, 3, 3]])
    target = T([[0.0, 0, 10, 10]] * 3)
    out = accuracy_at_iou(preds, target, thresholds=(0.5,))
    assert out["acc@0.5"].item() == pytest.approx(1 / 3)


def test_accuracy_accumulates_and_survives_empty_batches():
    m = AccuracyAtIoU()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = m.compute()
    assert set(empty) == {"acc@0.5", "acc@0.6", "acc@0.7", "acc@0.8", "acc@0.9"}
    assert all(v.item() == 0 for v in empty.values())  # nothing seen: 0, not NaN
    m.update(torch.empty(0, 4), torch.empty(0, 4))
    # IoU 0.64 with [0,0,10,10] for a box [0,0,8,8]
    m.update(T([[0.0, 0, 8, 8]]), T([[0.0, 0, 10, 10]]))
    m.update(T([[0.0, 0, 10, 10], [20, 20, 30, 30]]), T([[0.0, 0, 10, 10], [0, 0, 10, 10]]))
    m.update(torch.empty(0, 4), torch.empty(0, 4))
    out = m.compute()
    assert out["acc@0.6"].item() == pytest.approx(2 / 3)
    assert out["acc@0.7"].item() == pytest.approx(1 / 3)
    assert m.total.item() == 3


def test_accuracy_rejects_bad_shapes_and_thresholds():
    with pytest.raises(ValueError, match="same shape"):
        accuracy_at_iou(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        accuracy_at_iou(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="thresholds"):
        AccuracyAtIoU(thresholds=(0.0,))


def test_accuracy_metric_flags():
    assert AccuracyAtIoU.is_differentiable is False
    assert AccuracyAtIoU.higher_is_better is True
    assert AccuracyAtIoU.full_state_update is False
    assert PhraseGroundingRecall.higher_is_better is True


# ------------------------------------------------------------------------------------- phrase grounding
# Phrase with two ground-truth boxes side by side; their enclosing box is [0, 0, 20, 10].
TWO_GT = T([[0.0, 0, 10, 10], [10, 0, 20, 10]])


def test_merged_vs_any_box():
    left = T([[0.0, 0, 10, 10]])  # IoU 1 with one ground truth, 0.5 with the merged box
    whole = T([[0.0, 0, 20, 10]])  # IoU 1 with the merged box, 0.5 with each ground truth
    merged = phrase_grounding_recall([left, whole], [TWO_GT, TWO_GT], iou_thresholds=(0.6,), mode="merged")
    any_box = phrase_grounding_recall([left, whole], [TWO_GT, TWO_GT], iou_thresholds=(0.6,), mode="any")
    assert merged["recall@1"].item() == pytest.approx(1 / 2)  # only "whole" hits
    assert any_box["recall@1"].item() == pytest.approx(1 / 2)  # only "left" hits
    both = phrase_grounding_recall([left, whole], [TWO_GT, TWO_GT], iou_thresholds=(0.5,), mode="any")
    assert both["recall@1"].item() == 1.0  # >= at exactly 0.5, as MDETR


def test_skipped_phrases_k_and_several_thresholds():
    gt = T([[0.0, 0, 10, 10]])
    ranked = T([[50.0, 50, 60, 60], [0, 0, 8, 8], [0, 0, 10, 10]])  # IoU 0, 0.64, 1 by rank
    out = phrase_grounding_recall(
        [ranked, ranked, T([[0.0, 0, 10, 10]])],
        [gt, torch.empty(0, 4), gt],  # the middle phrase has no ground truth: not counted
        k=(1, 2, 5),
        iou_thresholds=(0.5, 0.7),
    )
    expected = {
        "recall@1@0.5": 1 / 2, "recall@1@0.7": 1 / 2,
        "recall@2@0.5": 1.0, "recall@2@0.7": 1 / 2,
        "recall@5@0.5": 1.0, "recall@5@0.7": 1.0,
    }  # fmt: skip
    assert {k: round(v.item(), 6) for k, v in out.items()} == pytest.approx(expected)


def test_no_predictions_and_nan_predictions_miss():
    gt = T([[0.0, 0, 10, 10]])
    out = phrase_grounding_recall(
        [torch.empty(0, 4), T([[NAN, NAN, NAN, NAN], [0.0, 0, 10, 10]]), T([[0.0, 0, 10, 10]])],
        [gt, gt, gt],
        k=(1, 2),
    )
    assert out["recall@1"].item() == pytest.approx(1 / 3)
    assert out["recall@2"].item() == pytest.approx(2 / 3)


def test_phrase_types_breakdown():
    m = PhraseGroundingRecall(k=(1,), phrase_types=("people", "animals", "scene"))
    gt = T([[0.0, 0, 10, 10]])
    hit, miss = T([[0.0, 0, 10, 10]]), T([[30.0, 30, 40, 40]])
    m.update([hit, miss, hit], [gt, gt, gt], types=["people", ["people", "animals"], "animals"])
    m.update([hit], [torch.empty(0, 4)], types=["scene"])  # skipped: no ground truth
    out = m.compute()
    assert out["recall@1"].item() == pytest.approx(2 / 3)
    assert out["recall@1/people"].item() == pytest.approx(1 / 2)
    assert out["recall@1/animals"].item() == pytest.approx(1 / 2)
    assert out["recall@1/scene"].item() == 0.0
    assert m.type_total.tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="unknown phrase type"):
        m.update([hit], [gt], types=["vehicles"])


def test_recall_accumulates_and_survives_empty_batches():
    m = PhraseGroundingRecall(k=(1, 3), mode="any")
    m.update([], [])
    gt = T([[0.0, 0, 10, 10]])
    m.update([T([[0.0, 0, 10, 10]])], [gt])
    m.update([T([[20.0, 0, 30, 10], [0, 0, 10, 10]])], [gt])
    m.update([], [])
    out = m.compute()
    assert out == {"recall@1": pytest.approx(T(0.5)), "recall@3": pytest.approx(T(1.0))}
    assert m.total.item() == 2
    m.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert m.compute()["recall@1"].item() == 0.0


def test_recall_argument_checks():
    with pytest.raises(ValueError, match="mode"):
        PhraseGroundingRecall(mode="best")
    with pytest.raises(ValueError, match="positive"):
        PhraseGroundingRecall(k=(0,))
    with pytest.raises(ValueError, match="one prediction list per phrase"):
        phrase_grounding_recall([torch.zeros(1, 4)], [])


def test_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)

    def rand_boxes(n: int) -> torch.Tensor:
        b = torch.rand(n, 4, generator=g) * 20
        b[:, 2:] += b[:, :2] + 1
        return b

    preds = [rand_boxes(int(n)) for n in torch.randint(0, 6, (40,), generator=g)]
    targets = [rand_boxes(int(n)) for n in torch.randint(0, 4, (40,), generator=g)]
    for mode in ("merged", "any"):
        out = phrase_grounding_recall(preds, targets, k=(1, 3), iou_thresholds=(0.3,), mode=mode)
        hits, total = {1: 0, 3: 0}, 0
        for p, t in zip(preds, targets):
            if len(t) == 0:
                continue
            total += 1
            if mode == "merged":
                t = torch.cat([t[:, :2].min(0).values, t[:, 2:].max(0).values])[None]
            for k in (1, 3):
                hits[k] += bool(len(p)) and bool((tv_box_iou(p[:k], t) >= 0.3).any())
        for k in (1, 3):
            assert math.isclose(out[f"recall@{k}"].item(), hits[k] / total, rel_tol=1e-6)


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    """On CUDA the IoU runs in the Triton kernels; the metric values must not change."""
    g = torch.Generator().manual_seed(2)
    preds, target = torch.rand(257, 4, generator=g) * 30, torch.rand(257, 4, generator=g) * 30
    preds[:, 2:] += preds[:, :2] + 1
    target[:, 2:] += target[:, :2] + 1
    preds[:100] = target[:100] + torch.rand(100, 4, generator=g)
    preds[5] = NAN
    phrase_preds = [preds[i : i + 3] for i in range(0, 90, 3)]
    phrase_targets = [target[i : i + (i % 3)] for i in range(0, 90, 3)]
    results = {}
    for device in ("cpu", "cuda"):
        acc = AccuracyAtIoU().to(device)
        rec = PhraseGroundingRecall(k=(1, 3), mode="any").to(device)
        acc.update(preds.to(device), target.to(device))
        rec.update([p.to(device) for p in phrase_preds], [t.to(device) for t in phrase_targets])
        results[device] = {**acc.compute(), **rec.compute()}
    assert results["cuda"]["acc@0.5"].device.type == "cuda"
    for key, value in results["cpu"].items():
        assert results["cuda"][key].item() == pytest.approx(value.item(), abs=1e-6), key

"""Algorithm 1 (SPR §3.2): the batched kernel path against the plain-Python transcription and hand-worked values."""

from __future__ import annotations

import random

import pytest

from spr_lightning.scoring.localization import (
    localization_score_reference,
    localization_scores,
    merge_dedup,
    pad_box_sets,
)

A = (10.0, 10.0, 50.0, 50.0)  # annotated object 1 (area 1600)
B = (60.0, 10.0, 90.0, 40.0)  # annotated object 2 (area 900)
C = (10.0, 60.0, 40.0, 90.0)  # an object only the grounder finds
A_SHIFT = (14.0, 10.0, 54.0, 50.0)  # IoU with A = 36*40 / (2*1600 - 36*40) = 1440/1760 = 0.8182
A_FAR = (30.0, 10.0, 70.0, 50.0)  # IoU with A = 800/2400 = 1/3: below the 0.5 filter


def _score(text, ground, anno, **kw):
    return localization_scores([text], [ground], [anno], **kw)[0]


# Hand-made cases: (name, B_text, B_ground, B_anno, expected S_loc worked out by hand)
CASES = [
    ("exact boxes for both objects", [A, B], [], [A, B], 1.0),
    ("one of two objects", [A], [], [A, B], 0.5),
    ("empty B_text, no grounder", [], [], [A, B], 0.0),
    # The grounder's C joins B_gt and B_pred, so it is always found: 1 (C) + 0 + 0 over three objects.
    ("empty B_text, grounder finds an extra object", [], [C], [A, B], 1 / 3),
    # The grounder re-finds A exactly: a duplicate of the annotation in B_gt and of the text box in B_pred.
    ("grounder box equals an annotation", [A], [A], [A, B], 0.5),
    # Same, but the text did not box A: the grounder's A is in B_pred and matches the annotation.
    ("grounder box matches an annotation, text silent", [], [A], [A, B], 0.5),
    ("duplicate written boxes count once", [A, A, A], [], [A, B], 0.5),
    ("imprecise written box", [A_SHIFT], [], [A], 1440 / 1760),
    ("written box below the 0.5 filter", [A_FAR], [], [A], 0.0),
    # Text first in B_pred: A_SHIFT (IoU 0.82 > 0.7 with the grounder's A) hides the grounder's exact box.
    ("imprecise written box beats the grounder's exact box", [A_SHIFT], [A], [A], 1440 / 1760),
    ("no annotations, no grounder", [A], [], [], 0.0),
    ("nothing at all", [], [], [], 0.0),
]


@pytest.mark.parametrize(("name", "text", "ground", "anno", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hand_made_cases(name, text, ground, anno, expected):
    ref = localization_score_reference(text, ground, anno)
    assert ref == pytest.approx(expected, abs=1e-9)
    assert _score(text, ground, anno).score == pytest.approx(expected, abs=1e-6)


def test_batch_of_hand_made_cases_matches_one_by_one():
    texts, grounds, annos = zip(*[(c[1], c[2], c[3]) for c in CASES])
    batched = localization_scores(texts, grounds, annos)
    assert [r.score for r in batched] == pytest.approx([c[4] for c in CASES], abs=1e-6)


def test_dedup_order_annotation_and_text_first():
    # The grounder's slightly-off copy of A (IoU 0.82 > 0.7) is dropped from both sets, not the originals.
    result = _score([A_SHIFT], [A], [A, B])
    assert result.gt_boxes == [A, B] and result.gt_sources == ["anno", "anno"]
    assert result.pred_boxes == [A_SHIFT] and result.pred_sources == ["text"]


def test_dedup_threshold_is_configurable():
    # At 0.9 the grounder's A (IoU 0.82 with the written box) is not a duplicate: it stays in B_pred and
    # gives A a perfect match, so the score rises from 0.82 to 1.
    loose = _score([A_SHIFT], [A], [A], dedup_iou_threshold=0.9)
    assert loose.pred_sources == ["text", "ground"]
    assert loose.score == pytest.approx(1.0)
    assert localization_score_reference([A_SHIFT], [A], [A], dedup_iou_threshold=0.9) == pytest.approx(1.0)


def random_box(rng: random.Random) -> tuple[float, float, float, float]:
    """A box of up to 40 px side somewhere in a 120 px square (shared with ``test_phrase_localization``)."""
    x, y = rng.uniform(0, 80), rng.uniform(0, 80)
    return (x, y, x + rng.uniform(0, 40), y + rng.uniform(0, 40))


def jitter(rng: random.Random, box):
    """``box`` with every coordinate moved by up to 4 px, so that IoUs land around the 0.5 / 0.7 thresholds."""
    return tuple(v + rng.uniform(-4, 4) for v in box)


def test_random_sets_match_reference():
    rng = random.Random(0)

    def box():
        return random_box(rng)

    def near(anno, p, n):
        return [jitter(rng, rng.choice(anno)) if anno and rng.random() < p else box() for _ in range(rng.randint(0, n))]

    texts, grounds, annos = [], [], []
    for _ in range(64):
        anno = [box() for _ in range(rng.randint(0, 5))]
        # Candidates copy annotations with noise so that many IoUs land around the 0.5 / 0.7 thresholds.
        texts.append(near(anno, 0.7, 6))
        grounds.append(near(anno, 0.5, 3))
        annos.append(anno)
    batched = localization_scores(texts, grounds, annos, backend="torch")
    expected = [localization_score_reference(t, g, a) for t, g, a in zip(texts, grounds, annos)]
    assert [r.score for r in batched] == pytest.approx(expected, abs=1e-5)


def test_merge_dedup_and_padding():
    boxes, origins = merge_dedup([[A, A], []], [[A, C], [C]])
    assert boxes == [[A, C], [C]] and origins == [[0, 1], [1]]
    padded, lengths = pad_box_sets([[A], [], [A, B, C]])
    assert padded.shape == (3, 3, 4) and lengths.tolist() == [1, 0, 3]
    assert padded[1].abs().sum() == 0
    empty, empty_len = pad_box_sets([[], []])
    assert empty.shape == (2, 1, 4) and empty_len.tolist() == [0, 0]


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="one text, ground and annotation set"):
        localization_scores([[A]], [], [[A]])
    assert localization_scores([], [], []) == []


@pytest.mark.gpu
def test_cuda_triton_path_matches_reference():
    texts, grounds, annos = zip(*[(c[1], c[2], c[3]) for c in CASES])
    on_gpu = localization_scores(texts, grounds, annos, device="cuda", backend="auto")
    assert [r.score for r in on_gpu] == pytest.approx([c[4] for c in CASES], abs=1e-6)
    assert [r.gt_boxes for r in on_gpu] == [r.gt_boxes for r in localization_scores(texts, grounds, annos)]

"""``loc_mode: algorithm1_gt``: Algorithm 1 with the grounder's boxes in ``B_gt`` only (``ground_in_pred=False``).

Hand-worked values where it differs from the paper's step 4, the batched path against the plain-Python reference
on random sets, and the builder choosing differently from the paper's score on a two-candidate query.
"""

from __future__ import annotations

import random

import pytest
from test_localization import A_SHIFT, A, B, C, jitter, random_box
from test_phrase_localization import RIGHT, ColourGrounder, _sample

from spr_lightning.rewarding import LOC_MODES, PreferenceBuilder
from spr_lightning.scoring.localization import localization_score_reference, localization_scores

# (name, B_text, B_ground, B_anno, S_loc as in the paper, S_loc with the grounder in B_gt only), worked by hand.
CASES = [
    # The paper: the grounder's A sits in B_pred and finds the annotated A for a description that boxed nothing.
    ("grounder finds A, text silent", [], [A], [A, B], 0.5, 0.0),
    # The paper: writing an imprecise box for A scores *less* than writing none (A_SHIFT hides the grounder's A).
    ("imprecise written box on a found object", [A_SHIFT], [A], [A, B], (1440 / 1760) / 2, (1440 / 1760) / 2),
    # An object only the grounder finds: always found in the paper, found only when written here.
    ("grounder-only object, text silent", [], [C], [A, B], 1 / 3, 0.0),
    ("grounder-only object, written", [C], [C], [A, B], 1 / 3, 1 / 3),
    ("no grounder: the two agree", [A], [], [A, B], 0.5, 0.5),
    ("nothing at all", [], [], [], 0.0, 0.0),
]


@pytest.mark.parametrize(("name", "text", "ground", "anno", "paper", "gt_only"), CASES, ids=[c[0] for c in CASES])
def test_hand_made_cases(name, text, ground, anno, paper, gt_only):
    assert localization_score_reference(text, ground, anno) == pytest.approx(paper, abs=1e-9)
    assert localization_score_reference(text, ground, anno, ground_in_pred=False) == pytest.approx(gt_only, abs=1e-9)
    (result,) = localization_scores([text], [ground], [anno], ground_in_pred=False)
    assert result.score == pytest.approx(gt_only, abs=1e-6)
    assert "ground" not in result.pred_sources


def test_gt_side_keeps_grounder_boxes():
    (result,) = localization_scores([[C]], [[A, C]], [[A, B]], ground_in_pred=False)
    assert result.gt_boxes == [A, B, C] and result.gt_sources == ["anno", "anno", "ground"]
    assert result.pred_boxes == [C] and result.pred_sources == ["text"]


def test_random_sets_match_reference():
    rng = random.Random(1)
    texts, grounds, annos = [], [], []
    for _ in range(64):
        anno = [random_box(rng) for _ in range(rng.randint(0, 5))]
        texts.append([jitter(rng, rng.choice(anno)) if anno and rng.random() < 0.7 else random_box(rng)
                      for _ in range(rng.randint(0, 6))])  # fmt: skip
        grounds.append([jitter(rng, rng.choice(anno)) if anno and rng.random() < 0.5 else random_box(rng)
                        for _ in range(rng.randint(0, 3))])  # fmt: skip
        annos.append(anno)
    batched = localization_scores(texts, grounds, annos, backend="torch", ground_in_pred=False)
    expected = [localization_score_reference(t, g, a, ground_in_pred=False) for t, g, a in zip(texts, grounds, annos)]
    assert [r.score for r in batched] == pytest.approx(expected, abs=1e-5)
    paper = [localization_score_reference(t, g, a) for t, g, a in zip(texts, grounds, annos)]
    assert paper != pytest.approx(expected, abs=1e-5)  # the sets are rich enough for the two steps to differ


def test_builder_gt_mode_prefers_written_boxes_over_none():
    # Same words, so the grounder finds both squares for both candidates. The paper's score puts its boxes in B_pred:
    # the description that boxes nothing scores 1.0 and beats RIGHT's two near boxes (0.94). With the grounder on
    # the ground-truth side only, boxing nothing scores 0.
    silent = "A red square and a blue square."
    (paper,) = PreferenceBuilder(semantic_scorer=None, grounder=ColourGrounder(), refine=False).predict_step(
        [_sample([RIGHT, silent])], 0
    )
    assert paper["json"]["chosen"] == silent
    assert "algorithm1_gt" in LOC_MODES
    builder = PreferenceBuilder(semantic_scorer=None, grounder=ColourGrounder(), refine=False, loc_mode="algorithm1_gt")
    (pair,) = builder.predict_step([_sample([RIGHT, silent])], 0)
    assert pair["json"]["chosen"] == RIGHT and pair["json"]["rejected"] == silent
    assert [s["loc"] for s in pair["json"]["all_scores"]] == pytest.approx([(1560 / 1680 + 2450 / 2550) / 2, 0.0])

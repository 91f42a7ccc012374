"""Phrase-matched localization score (``loc_mode: phrase``): hand-worked values, the batched kernel path against
the plain-Python transcription, and the PreferenceBuilder wiring (one grounder call per phrase, ranking)."""

from __future__ import annotations

import glob
import io
import json
import random
import sys

import pytest
import torch
import webdataset as wds
from PIL import Image
from test_localization import jitter, random_box

from spr_lightning.coords import get_codec
from spr_lightning.rewarding import PreferenceBuilder
from spr_lightning.scoring.grounders import GroundingResult
from spr_lightning.scoring.localization import localization_score_reference
from spr_lightning.scoring.phrase_localization import (
    phrase_localization_score_reference,
    phrase_localization_scores,
    phrase_targets,
    phrase_targets_reference,
)
from spr_lightning.shards import SCHEMA_VERSION

A = (10.0, 10.0, 50.0, 50.0)  # the object the phrase names (area 1600)
B = (60.0, 10.0, 90.0, 40.0)  # another annotated object
D = (10.0, 60.0, 40.0, 90.0)  # a third annotated object
NOWHERE = (60.0, 60.0, 95.0, 95.0)  # on no object
A_SHIFT = (14.0, 10.0, 54.0, 50.0)  # IoU with A = 1440/1760 = 0.8182
A_FAR = (30.0, 10.0, 70.0, 50.0)  # IoU with A = 1/3: below the 0.5 filter
A_GROUND = (11.0, 10.0, 50.0, 50.0)  # the grounder's slightly-off copy of A: IoU 1560/1600 = 0.975 > 0.7


def _one(text, targets, **kw):
    return phrase_localization_scores([text], [targets], **kw)[0]


# (name, written boxes, per-box targets, expected S_loc by hand)
CASES = [
    ("box on the named object", [A_SHIFT], [[A]], 1440 / 1760),
    ("box on no object", [NOWHERE], [[A]], 0.0),
    ("box on another object than the named one", [B], [[A]], 0.0),
    ("box below the 0.5 filter", [A_FAR], [[A]], 0.0),
    ("phrase the grounder cannot find", [A], [[]], 0.0),
    ("best of several targets", [B], [[A, B]], 1.0),
    ("two phrases, one right", [A, D], [[A], [B]], 0.5),
    ("the same object written twice counts once", [A, A], [[A], [A]], 0.5),
    ("no written boxes", [], [], 0.0),
]


@pytest.mark.parametrize(("name", "text", "targets", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hand_made_cases(name, text, targets, expected):
    assert phrase_localization_score_reference(text, targets) == pytest.approx(expected, abs=1e-9)
    score, per_box = _one(text, targets)
    assert score == pytest.approx(expected, abs=1e-6)
    assert len(per_box) == len(text)


def test_batch_of_hand_made_cases_matches_one_by_one():
    scored = phrase_localization_scores([c[1] for c in CASES], [c[2] for c in CASES])
    assert [s for s, _ in scored] == pytest.approx([c[3] for c in CASES], abs=1e-6)
    assert scored[6][1] == pytest.approx([1.0, 0.0])  # per-box scores, in text order


def test_ranks_the_named_object_first_where_algorithm1_does_not():
    """The reason the option exists (docs/results/notebook.md, session 17): three annotated objects, the grounder finds
    the named one (A). Algorithm 1 ranks a box on an unnamed object above one on nowhere above one on A."""
    anno, ground = [A, B, D], [A]
    alg1 = {name: localization_score_reference([box], ground, anno)
            for name, box in (("named", A_SHIFT), ("nowhere", NOWHERE), ("unnamed", B))}  # fmt: skip
    assert alg1["unnamed"] > alg1["nowhere"] > alg1["named"]
    assert alg1["named"] == pytest.approx(1440 / 1760 / 3) and alg1["unnamed"] == pytest.approx(2 / 3)
    (targets,) = phrase_targets([ground], [anno])
    phrase = {name: _one([box], [targets])[0] for name, box in (("named", A_SHIFT), ("nowhere", NOWHERE),
                                                                ("unnamed", B))}  # fmt: skip
    assert phrase["named"] == pytest.approx(1440 / 1760)
    assert phrase["nowhere"] == phrase["unnamed"] == 0.0


def test_targets_snap_to_annotations_and_dedup():
    # The grounder's near copy of A becomes the human box; C (no annotation) stays; a second copy of A is dropped.
    C = (10.0, 60.0, 20.0, 70.0)
    cases = [([A_GROUND, C, A], [A, B]), ([A_SHIFT], [A]), ([A_FAR], [A]), ([], [A]), ([A_GROUND], [])]
    got = phrase_targets([g for g, _ in cases], [a for _, a in cases])
    assert got[0] == [A, C]
    assert got[1] == [A] and got[2] == [A_FAR]  # IoU 0.82 > 0.7 snaps; 1/3 does not
    assert got[3] == [] and got[4] == [A_GROUND]  # nothing found; no annotation to snap to
    assert got == [phrase_targets_reference(g, a) for g, a in cases]


def test_random_sets_match_reference():
    rng = random.Random(0)

    def box():
        return random_box(rng)

    grounds, annos, texts, targets = [], [], [], []
    for _ in range(48):
        anno = [box() for _ in range(rng.randint(0, 5))]
        phrases = [[jitter(rng, rng.choice(anno)) if anno and rng.random() < 0.6 else box()
                    for _ in range(rng.randint(0, 3))] for _ in range(rng.randint(1, 3))]  # fmt: skip
        grounds += phrases
        annos += [anno] * len(phrases)
        snapped = phrase_targets(phrases, [anno] * len(phrases), backend="torch")
        assert snapped == [phrase_targets_reference(g, anno) for g in phrases]
        which = [rng.randrange(len(phrases)) for _ in range(rng.randint(0, 5))]
        texts.append([jitter(rng, rng.choice(snapped[k])) if snapped[k] and rng.random() < 0.7 else box()
                      for k in which])
        targets.append([snapped[k] for k in which])
    scored = phrase_localization_scores(texts, targets, backend="torch")
    expected = [phrase_localization_score_reference(t, g) for t, g in zip(texts, targets)]
    assert [s for s, _ in scored] == pytest.approx(expected, abs=1e-5)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="targets for every description"):
        phrase_localization_scores([[A]], [])
    with pytest.raises(ValueError, match="description 0: 2 written boxes but 1 target sets"):
        phrase_localization_scores([[A, B]], [[[A]]])
    with pytest.raises(ValueError, match="one annotation set per grounder set"):
        phrase_targets([[A]], [])
    assert phrase_localization_scores([], []) == [] and phrase_targets([], []) == []


@pytest.mark.gpu
def test_cuda_path_matches_reference():
    scored = phrase_localization_scores([c[1] for c in CASES], [c[2] for c in CASES], device="cuda")
    assert [s for s, _ in scored] == pytest.approx([c[3] for c in CASES], abs=1e-6)


# ------------------------------------------------------------------------------------------ PreferenceBuilder
SIZE = (200, 100)
FERRET = get_codec("ferret")
RED = (20.0, 20.0, 60.0, 60.0)
BLUE = (120.0, 30.0, 170.0, 80.0)


def _enc(box):
    return FERRET.encode(box, SIZE)


# Same words, so S_sem and the grounder's boxes tie: the written boxes decide.
RIGHT = f"A red square {_enc((21, 20, 61, 61))} and a blue square {_enc((121, 30, 171, 80))}."
SWAPPED = f"A red square {_enc(BLUE)} and a blue square {_enc(RED)}."


class ColourGrounder:
    """Finds the red square for captions naming red, the blue one for blue; records its captions."""

    def __init__(self) -> None:
        self.captions: list[str] = []

    def ground(self, image, caption, box_threshold=0.35, text_threshold=0.25):
        self.captions.append(caption)
        boxes = [box for word, box in (("red", RED), ("blue", BLUE)) if word in caption.lower()]
        return GroundingResult(boxes=torch.tensor(boxes).reshape(-1, 4), scores=torch.ones(len(boxes)),
                               phrases=["object"] * len(boxes))  # fmt: skip


def _sample(candidates: list[str]) -> dict:
    image = Image.new("RGB", SIZE, (40, 40, 40))
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    record = {
        "schema": SCHEMA_VERSION, "query_id": "q0", "region_id": "q0", "image_id": 0, "file_name": "q0.jpg",
        "image_size": list(SIZE), "region": [10.0, 10.0, 180.0, 90.0], "crop_box": [0.0, 0.0, 200.0, 100.0],
        "objects": [{"box": list(RED), "label": "red square"}, {"box": list(BLUE), "label": "blue square"}],
        "prompt": "Describe the region.", "candidates": candidates, "raw_candidates": candidates,
        "templates": ["region"] * len(candidates), "coord_format": "ferret", "model": "synthetic",
    }  # fmt: skip
    return {"__key__": "q0", "json": record, "image": image, "image_bytes": buf.getvalue(), "image_ext": "jpg"}


def test_builder_phrase_mode_prefers_boxes_on_their_own_phrase():
    # Algorithm 1: the grounder's RED and BLUE sit in B_pred too, and SWAPPED's boxes are exact copies of them,
    # so SWAPPED scores 1.0 and beats RIGHT (two near boxes, 0.94): the binding error wins.
    (alg1,) = PreferenceBuilder(semantic_scorer=None, grounder=ColourGrounder(), refine=False).predict_step(
        [_sample([RIGHT, SWAPPED])], 0
    )
    assert alg1["json"]["chosen"] == SWAPPED
    assert [s["loc"] for s in alg1["json"]["all_scores"]] == pytest.approx([(1560 / 1680 + 2450 / 2550) / 2, 1.0])

    grounder = ColourGrounder()
    builder = PreferenceBuilder(semantic_scorer=None, grounder=grounder, refine=False, loc_mode="phrase")
    (pair,) = builder.predict_step([_sample([RIGHT, SWAPPED])], 0)
    rec = pair["json"]
    assert rec["chosen"] == RIGHT and rec["rejected"] == SWAPPED
    assert rec["all_scores"][0]["box_loc"] == pytest.approx([1560 / 1680, 2450 / 2550])
    assert rec["all_scores"][1]["box_loc"] == [0.0, 0.0]
    assert sorted(grounder.captions) == ["A red square", "a blue square"]  # once per distinct phrase


def test_builder_phrase_mode_refines_onto_annotations():
    builder = PreferenceBuilder(semantic_scorer=None, grounder=ColourGrounder(), loc_mode="phrase")
    (pair,) = builder.predict_step([_sample([RIGHT, SWAPPED])], 0)
    assert [g.xyxy for g in FERRET.decode(pair["json"]["chosen"], SIZE)] == [RED, BLUE]


def test_builder_rejects_unknown_loc_mode():
    with pytest.raises(ValueError, match="loc_mode must be one of"):
        PreferenceBuilder(loc_mode="phrases")
    with pytest.raises(ValueError, match="needs a grounder"):
        PreferenceBuilder(loc_mode="phrase", grounder=None)



def test_cli_phrase_mode_with_tiny_grounding_dino(tmp_path, monkeypatch):
    """``--model.init_args.loc_mode phrase`` through LightningCLI with the real (tiny, random) HF Grounding DINO: one
    per-box score per written box is recorded, and S_loc is their mean."""
    from test_rewarding import QUERIES, _config, write_candidates
    from test_rewarding import SIZE as FIXTURE_SIZE

    from spr_lightning.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # cli_main parses its args, not pytest's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are all overhead; see test_rewarding
    try:
        config = _config(tmp_path, write_candidates(tmp_path / "cands"), tmp_path / "pairs")
        cli = cli_main(["predict", "--config", str(config), "--model.init_args.loc_mode", "phrase"])
    finally:
        torch.set_num_threads(threads)
    assert cli.model.hparams.loc_mode == "phrase" and cli.model.summary["queries"] == 5
    shards = sorted(glob.glob(str(tmp_path / "pairs" / "*.tar")))
    records = [json.loads(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)]
    assert records, "no pairs written"
    for rec in records:
        for text, entry in zip(QUERIES[rec["query_id"]], rec["all_scores"]):
            boxes = FERRET.decode(text, FIXTURE_SIZE)
            assert len(entry["box_loc"]) == len(boxes)
            assert entry["loc"] == pytest.approx(sum(entry["box_loc"]) / len(boxes) if boxes else 0.0, abs=1e-6)

"""Model output the parsers cannot use, and configs with a wrong key or type.

Unusable answers (no box, malformed box text, boxes out of range, reversed, NaN, empty) are misses in the metrics
and zero-localization candidates in scoring — never an exception. A wrong config key or type stops the CLI with
LightningCLI's message before any model weights are touched."""

from __future__ import annotations

import math

import pytest
import torch
from fault_tools import REPO
from fixtures_coco import write_coco_fixture

from spr_lightning.cli import cli_main
from spr_lightning.coords import get_codec
from spr_lightning.evaluation import GroundingEvaluator
from spr_lightning.generation import candidate_to_image
from spr_lightning.rewarding import PreferenceBuilder
from spr_lightning.shards import SCHEMA_VERSION

SIZE = (96, 64)
FERRET = get_codec("ferret")
TARGET = (8.0, 8.0, 40.0, 32.0)
GOOD = f"It is at {FERRET.encode(TARGET, SIZE)}."
BAD_ANSWERS = {
    "no_box": "I cannot tell.",
    "cut_box": "It is at [12, 3",
    "out_of_range": "[0, 0, 5000, 5000]",
    "reversed": "[999, 999, 600, 600]",  # corners put in order by the codec, then scored by IoU
    "nan": "[nan, 1, 2, 3]",
    "overflow": "[1e309, 1, 2, 3]",
    "brackets": "[[[[ ]]]",
    "zero_area": "[10, 10, 10, 10]",
    "empty": "",
    "json_garbage": '{"bbox_2d": [1, 2]}',
    "huge": "[1, 2, 3, 4] " * 1000,  # far past any max_new_tokens; 5000 boxes cost ~40 s in Algorithm 1 on CPU
}


@pytest.fixture(scope="module")
def evaluator():
    return GroundingEvaluator("tiny:llava", coord_format="ferret", task="rec")


def test_unusable_rec_answers_are_misses_never_errors(evaluator):
    answers = [GOOD, *BAD_ANSWERS.values()]
    batch = [{"target": torch.tensor(TARGET), "image_size": SIZE} for _ in answers]
    evaluator.metric.reset()
    rows = evaluator._score_rec(batch, answers, [evaluator.codec] * len(answers))
    values = {k: float(v) for k, v in evaluator.metric.compute().items()}
    assert values["acc@0.5"] == pytest.approx(1 / len(answers))  # only the good answer counts; all are in the total
    assert rows[0]["iou"] > 0.9 and all(r["iou"] < 0.5 for r in rows[1:])
    assert rows[1]["pred_box"] is None and all(math.isfinite(r["iou"]) for r in rows)


def test_unusable_phrase_answers_are_misses_never_errors():
    evaluator = GroundingEvaluator("tiny:llava", coord_format="ferret", task="phrase")
    targets = [torch.tensor([TARGET]), torch.tensor([[50.0, 30.0, 90.0, 60.0]])]
    answers = list(BAD_ANSWERS.values())
    batch = [{"phrases": ["a red box", "a green box"], "targets": targets, "image_size": SIZE} for _ in answers]
    evaluator._score_phrase(batch, answers, [evaluator.codec] * len(answers))
    values = {k: float(v) for k, v in evaluator.metric.compute().items()}
    assert values["recall@1"] == 0.0


def test_unusable_candidates_score_zero_localization_never_errors():
    from PIL import Image

    record = {"schema": SCHEMA_VERSION, "query_id": "q", "image_id": 1, "image_size": list(SIZE),
              "region": [0, 0, *SIZE], "crop_box": [0, 0, *SIZE], "prompt": "p", "coord_format": "ferret",
              "candidates": [GOOD, *BAD_ANSWERS.values()], "objects": [{"box": list(TARGET), "label": "box"}]}
    sample = {"__key__": "q", "json": record, "image": Image.new("RGB", SIZE), "image_bytes": b"", "image_ext": "png"}
    builder = PreferenceBuilder(semantic_scorer=None, grounder=None, refine=False)
    (pair,) = builder.predict_step([sample], 0)
    loc = [s["loc"] for s in pair["json"]["all_scores"]]
    assert pair["json"]["chosen"] == GOOD and loc[0] > 0.9 and all(0.0 <= v < 0.5 for v in loc[1:])


@pytest.mark.parametrize("answer", list(BAD_ANSWERS.values()), ids=list(BAD_ANSWERS))
def test_unusable_crop_answers_are_kept_as_text_by_generation(answer):
    text, boxes = candidate_to_image(answer, FERRET, (10, 10, 50, 40), (40, 30), SIZE)
    assert isinstance(text, str)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 <= x2 <= SIZE[0] and 0 <= y1 <= y2 <= SIZE[1]


# ------------------------------------------------------------------------------------------------- configs
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights (VLM, processor, CLIP, Grounding DINO) fails the test."""
    import open_clip
    import transformers

    calls: list[str] = []

    def forbid(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: a model loaded before the config was checked")
        return load

    for auto in ("AutoModelForImageTextToText", "AutoProcessor", "AutoModelForZeroShotObjectDetection"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", forbid(auto))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbid("open_clip"))
    return calls


STAGES = {
    "generate": ("predict", "configs/generate/tiny_llava.yaml",
                 ("--model.init_args.num_candidatez=2", "num_candidatez"),
                 ("--model.init_args.num_candidates=many", "num_candidates")),
    "score": ("predict", "configs/score/tiny.yaml",
              ("--model.init_args.lamda=0.5", "lamda"),
              ("--model.init_args.lam=high", "lam")),
    "dpo": ("fit", "configs/dpo/tiny_llava.yaml",
            ("--model.init_args.lora_rank=8", "lora_rank"),
            ("--model.init_args.beta=big", "beta")),
    "eval": ("validate", "configs/eval/tiny_refcoco.yaml",
             ("--data.init_args.splitt=val", "splitt"),
             ("--data.init_args.batch_size=two", "batch_size")),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("fault", ["wrong_key", "wrong_type"])
def test_wrong_config_key_or_type_fails_at_start_naming_it(stage, fault, no_model_loads, capsys, tmp_path):
    subcommand, config, wrong_key, wrong_type = STAGES[stage]
    override, name = wrong_key if fault == "wrong_key" else wrong_type
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--config", str(REPO / config), override])
    assert exit_info.value.code not in (0, None)
    assert name in capsys.readouterr().err
    assert no_model_loads == []


def test_wrong_on_error_value_fails_at_start(no_model_loads, capsys, tmp_path):
    coco = write_coco_fixture(tmp_path / "coco", num_images=1)
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", str(REPO / "configs/generate/tiny_llava.yaml"),
                  f"--data.init_args.annotations={coco.annotations}", "--data.init_args.on_error=ignore"])
    assert "on_error" in capsys.readouterr().err and no_model_loads == []

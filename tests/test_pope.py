"""POPE (SPR Tab. 6): answers read by POPE's own rule, hand-worked metrics, the question files' layouts, and
``validate`` end to end on a tiny fixture."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_captioning import write_pope_fixture

from datamodules.pope import POPEDataModule, load_pope_questions
from spr_lightning.cli import cli_main
from spr_lightning.metrics import POPEMetrics
from spr_lightning.metrics.pope import POPE_METRICS, parse_pope_answer, pope_metrics
from spr_lightning.pope import LLAVA_POPE_PROMPT, POPEEvaluator

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"


def _pope_script_reads(text: str) -> str:
    """The answer loop of POPE's ``evaluate.py`` (RUCAIBox/POPE), transcribed as it is written there."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


@pytest.mark.parametrize(("answer", "parsed"), [
    ("Yes.", "yes"),
    ("no, there is not", "no"),        # "no" after the comma is dropped
    ("I cannot tell", "yes"),          # no word is exactly No / not / no: POPE counts it as yes
    ("No", "no"),
    ("NO", "yes"),                     # case matters in POPE's rule
    ("Not sure.", "yes"),              # "Not" is not in the list
    ("There is no dog in the image.", "no"),
    ("Yes, there is a dog. There is no cat.", "yes"),  # only the first sentence is read
    ("It is not. No.", "no"),
    ("yes\nno", "yes"),                # split on single spaces only
    ("", "yes"),
])
def test_answers_are_read_as_pope_reads_them(answer, parsed):
    assert parse_pope_answer(answer) == parsed == _pope_script_reads(answer)


# Hand-worked: "Yes." (label yes) TP; "no, there is not" (no) TN; "I cannot tell" (no) FP; "No." (yes) FN;
# "Yes, there is a dog." (yes) TP; "There is no cat in the image." (no) TN.
# TP 2, FP 1, TN 2, FN 1 -> accuracy 4/6, precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/6.
ANSWERS = ["Yes.", "no, there is not", "I cannot tell", "No.", "Yes, there is a dog.", "There is no cat in the image."]
LABELS = ["yes", "no", "no", "yes", "yes", "no"]


def _floats(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()}


def test_metrics_on_hand_worked_answers():
    expected = {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5}
    metric = POPEMetrics()
    metric.update(ANSWERS[:3], LABELS[:3])
    metric.update(ANSWERS[3:], LABELS[3:])
    assert _floats(metric.compute()) == pytest.approx(expected)
    assert _floats(pope_metrics(ANSWERS, LABELS)) == pytest.approx(expected)
    assert metric.counts.tolist() == [[2, 1, 2, 1]]  # TP, FP, TN, FN


def test_metrics_per_split_averaged_and_pooled():
    metric = POPEMetrics(splits=("random", "popular", "adversarial"))
    metric.update(ANSWERS, LABELS, ["random"] * 4 + ["adversarial"] * 2)
    values = _floats(metric.compute())
    # random: TP 1, TN 1, FP 1, FN 1 -> all 0.5; adversarial: TP 1, TN 1 -> all 1, yes-ratio 0.5; popular unseen
    assert {k: values[f"random/{k}"] for k in POPE_METRICS} == pytest.approx(dict.fromkeys(POPE_METRICS, 0.5))
    assert values["adversarial/f1"] == 1.0 and values["adversarial/yes_ratio"] == 0.5
    assert not any(k.startswith("popular/") for k in values)
    assert values["avg/accuracy"] == pytest.approx(0.75) and values["avg/f1"] == pytest.approx(0.75)
    assert values["all/accuracy"] == pytest.approx(4 / 6) and values["all/yes_ratio"] == pytest.approx(0.5)


def test_zero_divisions_give_zero_and_inputs_are_checked():
    values = _floats(pope_metrics(["No.", "no"], ["no", "no"]))
    assert values == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match=r"labels\[1\] must be 'yes' or 'no'"):
        pope_metrics(["Yes", "Yes"], ["yes", "maybe"])
    metric = POPEMetrics(splits=("random",))
    with pytest.raises(ValueError, match="unknown POPE split"):
        metric.update(["Yes"], ["yes"], ["popular"])
    assert metric.counts.sum() == 0  # a refused batch adds nothing
    with pytest.raises(ValueError, match="no splits"):
        POPEMetrics().update(["Yes"], ["yes"], ["random"])


def test_question_files_jsonl_and_json_array(tmp_path):
    pope = write_pope_fixture(tmp_path / "pope")
    for split, rows in pope["questions"].items():  # random is JSON Lines, adversarial a JSON array
        records = load_pope_questions(pope["question_files"][split], split)
        assert [(r["question_id"], r["question"], r["label"]) for r in records] == rows
        assert records[0]["key"] == f"{split}-1" and records[0]["split"] == split
    dm = POPEDataModule(pope["question_files"], pope["image_root"], batch_size=8, num_workers=0, max_samples=2)
    batch = next(iter(dm.val_dataloader()))
    assert [s["key"] for s in batch] == ["random-1", "random-2", "adversarial-1", "adversarial-2"]
    assert batch[1]["file_name"] == "COCO_val2014_000000000073.jpg" and batch[1]["image"].size == (48, 40)


def test_bad_question_error_names_file_and_question(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n"
                    + json.dumps({"question_id": 7, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}))
    with pytest.raises(ValueError, match=r"coco_pope_random.json: question 2 \(question_id=7\): label must be yes/no"):
        load_pope_questions(path, "random")


def test_prompt_template_needs_the_question():
    with pytest.raises(ValueError, match="exactly the field"):
        POPEEvaluator("tiny:llava", prompt_template="Is there a {object}?")
    assert LLAVA_POPE_PROMPT.format(question="Is there a dog?").endswith("using a single word or phrase.")


# --------------------------------------------------------------------------------------- end to end
def _validate(monkeypatch, pope: dict, out: Path):
    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # pytest's own arguments are not the CLI's
    files = ", ".join(f"{split}: {path}" for split, path in pope["question_files"].items())
    cli = cli_main(["validate", "--config", str(CONFIGS / "tiny_pope.yaml"), "--trainer.default_root_dir", str(out),
                    "--data.init_args.image_root", pope["image_root"], "--data.init_args.question_files",
                    f"{{{files}}}"])
    records = [json.loads(line) for line in (out / "predictions-rank0.jsonl").read_text().splitlines()]
    return {k: v.item() for k, v in cli.trainer.callback_metrics.items()}, records


def test_pope_metrics_from_fake_generations(tmp_path, monkeypatch, capsys):
    pope = write_pope_fixture(tmp_path / "pope")
    answers = {"dog": "Yes, there is a dog.", "car": "No.", "person": "I cannot tell", "cat": "There is a cat."}

    def generate(self, prompts, images):
        return [next(a for word, a in answers.items() if word in p) for p in prompts]

    monkeypatch.setattr(POPEEvaluator, "generate", generate)
    metrics, records = _validate(monkeypatch, pope, tmp_path / "out")
    # random: dog yes/yes TP, car no/no TN, person "I cannot tell"/no FP -> acc 2/3, P 1/2, R 1, F1 2/3
    # adversarial: dog TP, cat "There is a cat."/no FP -> acc 1/2, P 1/2, R 1, F1 2/3, yes-ratio 1
    assert metrics["val/random/accuracy"] == pytest.approx(2 / 3)
    assert metrics["val/random/precision"] == pytest.approx(0.5) and metrics["val/random/recall"] == 1.0
    assert metrics["val/adversarial/accuracy"] == pytest.approx(0.5)
    assert metrics["val/adversarial/yes_ratio"] == 1.0
    assert metrics["val/avg/f1"] == pytest.approx(2 / 3) and metrics["val/avg/accuracy"] == pytest.approx(7 / 12)
    assert metrics["val/all/accuracy"] == pytest.approx(3 / 5) and metrics["val/all/yes_ratio"] == pytest.approx(4 / 5)
    assert not any("popular" in k for k in metrics)  # the override replaced the config's three files
    by_key = {r["key"]: r for r in records}
    assert by_key["random-3"] == {"key": "random-3", "split": "random", "question_id": 3,
                                  "prompt": "Is there a person in the image?", "generation": "I cannot tell",
                                  "answer": "yes", "label": "no"}
    assert "val pope | tiny:llava | 5 samples" in capsys.readouterr().out


def test_pope_validate_end_to_end_with_tiny_model(tmp_path, monkeypatch):
    pope = write_pope_fixture(tmp_path / "pope")
    metrics, records = _validate(monkeypatch, pope, tmp_path / "out")
    assert [r["key"] for r in records] == ["random-1", "random-2", "random-3", "adversarial-1", "adversarial-2"]
    assert all(r["answer"] == parse_pope_answer(r["generation"]) for r in records)
    assert {f"val/{s}/{m}" for s in ("random", "adversarial", "avg", "all") for m in POPE_METRICS} == set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.parametrize("name", ["pope.yaml", "tiny_pope.yaml"])
def test_pope_configs_name_real_arguments(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    for section, cls in (("model", POPEEvaluator), ("data", POPEDataModule)):
        assert config[section]["class_path"] == f"{cls.__module__}.{cls.__name__}"
        assert set(config[section]["init_args"]) <= set(inspect.signature(cls).parameters)
    assert set(config["data"]["init_args"]["question_files"]) == {"random", "popular", "adversarial"}
    tiny = name.startswith("tiny_")
    assert config["trainer"]["accelerator"] == ("cpu" if tiny else "gpu")
    assert (config["model"]["init_args"]["model_name_or_path"] == "tiny:llava") == tiny
    assert config["model"]["init_args"]["dtype"] == ("float32" if tiny else "bfloat16")

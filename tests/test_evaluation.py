"""Evaluation stage: grounding datamodules on real-layout fixtures, the box-matching rules, and
``python -m spr_lightning validate`` end to end (hand-checkable metrics through a fake generation)."""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_grounding import write_flickr_fixture, write_refcoco_fixture

from datamodules.grounding import (
    Flickr30kEntitiesDataModule,
    RefCOCODataModule,
    convert_refer,
    load_flickr_records,
    load_refcoco_records,
    refer_to_records,
)
from spr_lightning.cli import cli_main
from spr_lightning.coords import Grounding, get_codec
from spr_lightning.evaluation import (
    _FIELDS,
    DEFAULT_PROMPTS,
    GroundingEvaluator,
    _template_fields,
    assign_phrase_boxes,
    join_phrases,
    normalize_phrase,
    rec_box,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "eval"
FERRET = get_codec("ferret")


@pytest.fixture
def refcoco(tmp_path):
    return write_refcoco_fixture(tmp_path / "refcoco")


@pytest.fixture
def flickr(tmp_path):
    return write_flickr_fixture(tmp_path / "flickr")


def _plain(sample: dict, keys: tuple[str, ...]) -> dict:
    return {k: sample[k] for k in keys}


# ------------------------------------------------------------------------------------------ datamodules
@pytest.mark.parametrize("split", ["val", "testA", "testB"])
def test_refcoco_datamodule_reads_one_sample_per_sentence_in_xyxy(refcoco, split):
    dm = RefCOCODataModule(refcoco["annotations"], refcoco["image_root"], split=split, batch_size=2, num_workers=0)
    dm.setup("validate")
    samples = [dm.dataset[i] for i in range(len(dm.dataset))]
    expected = refcoco[split]
    assert [_plain(s, ("key", "file_name", "expression")) for s in samples] == [
        _plain(e, ("key", "file_name", "expression")) for e in expected]
    for sample, exp in zip(samples, expected):
        assert sample["target"].tolist() == exp["box"]  # xywh [8, 8, 32, 24] -> xyxy [8, 8, 40, 32]
        assert sample["image"].size == sample["image_size"]
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, list) and [s["key"] for s in batch] == [e["key"] for e in expected[:2]]


def test_refcoco_max_samples_and_split_check(refcoco):
    dm = RefCOCODataModule(refcoco["annotations"], refcoco["image_root"], split="val", max_samples=2, num_workers=0)
    dm.setup()
    assert len(dm.dataset) == 2
    with pytest.raises(ValueError, match="split must be one of"):
        RefCOCODataModule(refcoco["annotations"], refcoco["image_root"], split="testC")


@pytest.mark.parametrize(("entry", "message"), [
    ({"id": 7, "file_name": "x.jpg", "sents": ["a"]}, "'bbox' must be"),
    ({"id": 7, "file_name": "x.jpg", "sents": ["a"], "bbox": [1, 2, 3]}, "'bbox' must be"),
    ({"id": 7, "file_name": "x.jpg", "bbox": [1, 2, 3, 4]}, "needs 'sents'"),
    ({"id": 7, "sents": ["a"], "bbox": [1, 2, 3, 4]}, "needs 'file_name'"),
    ({"id": 7, "file_name": "x.jpg", "sents": [""], "bbox": [1, 2, 3, 4]}, "non-empty string"),
])
def test_refcoco_bad_record_error_names_file_and_entry(tmp_path, entry, message):
    path = tmp_path / "refs.json"
    good = {"id": 1, "file_name": "x.jpg", "sents": ["a"], "bbox": [1, 2, 3, 4], "split": "val"}
    path.write_text(json.dumps([good, {**entry, "split": "val"}]))
    with pytest.raises(ValueError, match=message) as err:
        load_refcoco_records(path, "val")
    assert str(path) in str(err.value) and "entry 1 (id=7)" in str(err.value)


def test_refcoco_wrong_image_size_is_reported(refcoco):
    refs = json.loads(Path(refcoco["annotations"]).read_text())
    refs[0]["width"] = 640
    Path(refcoco["annotations"]).write_text(json.dumps(refs))
    dm = RefCOCODataModule(refcoco["annotations"], refcoco["image_root"], num_workers=0)
    dm.setup()
    with pytest.raises(ValueError, match="is 96x64 but the annotations say 640x64"):
        dm.dataset[0]


def test_refer_conversion_takes_image_names_from_instances(tmp_path):
    refs = [{"ref_id": 5, "ann_id": 50, "image_id": 9, "split": "testB", "file_name": "COCO_train2014_9_50.jpg",
             "sentences": [{"sent": "left man", "raw": "Left man"}, {"sent": "man on left", "raw": "man on left"}]}]
    instances = {"images": [{"id": 9, "file_name": "COCO_train2014_9.jpg", "height": 20, "width": 30}],
                 "annotations": [{"id": 50, "image_id": 9, "bbox": [1, 2, 3, 4]}]}
    assert refer_to_records(refs, instances) == [{
        "id": 5, "image_id": 9, "file_name": "COCO_train2014_9.jpg", "sents": ["left man", "man on left"],
        "bbox": [1, 2, 3, 4], "split": "testB", "height": 20, "width": 30}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    assert convert_refer(tmp_path, "unc", tmp_path / "out.json") == 1
    samples = load_refcoco_records(tmp_path / "out.json", "testB")
    assert [(s["key"], s["expression"], s["box"]) for s in samples] == [
        ("5-0", "left man", [1.0, 2.0, 4.0, 6.0]), ("5-1", "man on left", [1.0, 2.0, 4.0, 6.0])]


def test_flickr_datamodule_phrases_and_boxes(flickr):
    dm = Flickr30kEntitiesDataModule(flickr["annotations"], flickr["image_root"], batch_size=2, num_workers=0)
    dm.setup("validate")
    assert len(dm.dataset) == 3  # one sample per image-caption entry (image 1000 has two captions)
    for i, expected in enumerate(flickr["samples"]):
        sample = dm.dataset[i]
        assert _plain(sample, ("key", "file_name", "caption", "phrases")) == _plain(
            expected, ("key", "file_name", "caption", "phrases"))
        assert [t.tolist() for t in sample["targets"]] == expected["boxes"]
        assert sample["image_size"] == sample["image"].size
    assert dm.dataset[0]["targets"][2].shape == (0, 4)  # "a park": listed but no box -> kept, skipped by metric


def test_flickr_without_tokens_positive_eval_uses_annotation_spans(flickr):
    data = json.loads(Path(flickr["annotations"]).read_text())
    for image in data["images"]:
        del image["tokens_positive_eval"]
    Path(flickr["annotations"]).write_text(json.dumps(data))
    records = load_flickr_records(flickr["annotations"])
    assert records[0]["phrases"] == ["A man", "two dogs"]
    assert records[1]["phrases"] == ["A person", "two small dogs", "the person"]


def test_flickr_bad_span_error_names_entry(flickr):
    data = json.loads(Path(flickr["annotations"]).read_text())
    data["images"][1]["tokens_positive_eval"][0] = [[0, 999]]
    Path(flickr["annotations"]).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[1\] \(id=1\): span \[0, 999\] lies outside"):
        load_flickr_records(flickr["annotations"])


# ------------------------------------------------------------------------------------------ pure logic
def _g(phrase, box):
    return Grounding(tuple(float(v) for v in box), (0, 0), phrase)


def test_normalize_and_join_phrases():
    assert normalize_phrase("The Man, in a red-shirt!") == "man in red shirt"
    assert normalize_phrase(None) == ""
    assert join_phrases(["A man", "two dogs, brown"]) == "a man, two dogs brown"


def test_rec_box_takes_first_box_or_nan():
    assert rec_box([_g("a", (1, 2, 3, 4)), _g("b", (5, 6, 7, 8))]) == (1.0, 2.0, 3.0, 4.0)
    assert all(math.isnan(v) for v in rec_box([]))


def test_assign_phrase_boxes_rules():
    a, b, c, d = (0, 0, 1, 1), (2, 2, 3, 3), (4, 4, 5, 5), (6, 6, 7, 7)
    # 1. equal text after normalisation, wherever it is written; consecutive boxes of one phrase stay together
    got = assign_phrase_boxes(["A dog", "The Man"], [_g("man", a), _g("two dog", b), _g("a dog", c), _g("a dog", d)])
    assert got == [[c, d], [a]]
    # 2. containment (the codec's phrase window cut the phrase) and 3. order of mention for the rest
    got = assign_phrase_boxes(["a young man in a red shirt", "a kite", "the sky"],
                              [_g("man in a red shirt", a), _g(None, b), _g("something", c)])
    assert got == [[a], [b], [c]]
    # duplicate phrases are dealt one mention each; phrases left over get nothing
    assert assign_phrase_boxes(["a person", "the person", "a dog"], [_g("person", a), _g("Person", b)]) == [
        [a], [b], []]
    assert assign_phrase_boxes(["x"], []) == [[]]


# ----------------------------------------------------------------------------------------- the module
def test_prompt_templates_are_checked_and_filled():
    with pytest.raises(ValueError, match=r"field\(s\) \['phrases'\] unknown for task 'rec'"):
        GroundingEvaluator("tiny:llava", task="rec", prompt_template="Find {phrases}")
    evaluator = GroundingEvaluator("tiny:llava", task="phrase")
    assert evaluator.prompt_template == DEFAULT_PROMPTS["phrase"]
    assert evaluator.render_prompt({"phrases": ["A man", "a dog"], "caption": "c"}) == (
        "What are the locations of a man, a dog?")


def test_qwen_boxes_are_read_in_the_processors_resized_pixels():
    from PIL import Image

    evaluator = GroundingEvaluator("tiny:qwen2_5_vl", coord_format="qwen2_5_vl")
    image = Image.new("RGB", (64, 48))
    (w2, h2), = evaluator.model_input_sizes([image])
    assert (w2 % 28, h2 % 28) == (0, 0)  # whole 28-px merged patches
    codec = evaluator._codecs([image])[0]
    box = codec.decode(f'{{"bbox_2d": [0, 0, {w2 // 2}, {h2 // 2}], "label": "x"}}', (64, 48))[0].xyxy
    assert box == pytest.approx((0.0, 0.0, 32.0, 24.0))


def test_adapter_is_loaded_on_top_and_generation_answers_every_prompt(tmp_path):
    from peft import PeftModel
    from PIL import Image

    from spr_lightning.models import apply_lora, load_policy

    adapter = tmp_path / "adapter"
    apply_lora(load_policy("tiny:llava"), r=2, alpha=4).save_pretrained(adapter)
    evaluator = GroundingEvaluator("tiny:llava", adapter_path=str(adapter), max_new_tokens=3)
    evaluator.configure_model()
    assert isinstance(evaluator.policy, PeftModel) and not evaluator.policy.training
    assert not any(p.requires_grad for p in evaluator.policy.parameters())
    answers = evaluator.generate(["Where is a?", "Where is the long b thing?"],
                                 [Image.new("RGB", (40, 30)), Image.new("RGB", (30, 60))])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def _fake_generate(monkeypatch, answers: list[tuple[str, str]]) -> None:
    """Replace generation by fixed answers, picked by a word of the prompt."""

    def generate(self, prompts, images):
        return [next(answer for needle, answer in answers if needle in prompt) for prompt in prompts]

    monkeypatch.setattr(GroundingEvaluator, "generate", generate)


def _validate(monkeypatch, config: str, data: dict, out: Path, *extra: str):
    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # pytest's own arguments are not the CLI's
    args = ["validate", "--config", str(CONFIGS / config), "--data.init_args.annotations", data["annotations"],
            "--data.init_args.image_root", data["image_root"], "--trainer.default_root_dir", str(out), *extra]
    cli = cli_main(args)
    lines = (out / "predictions-rank0.jsonl").read_text().splitlines()
    return cli.trainer.callback_metrics, {r["key"]: r for r in map(json.loads, lines)}


def test_rec_metric_from_fake_generations(refcoco, tmp_path, monkeypatch, capsys):
    size = (96, 64)
    _fake_generate(monkeypatch, [
        ("red box on the left", f"It is at {FERRET.encode((8, 8, 40, 32), size)}."),  # correct box -> hit
        ("top left red one", "I cannot tell."),                                       # no box -> miss
        ("green box", f"{FERRET.encode((8, 8, 40, 32), size)}"),                      # the red box -> miss
    ])
    metrics, records = _validate(monkeypatch, "tiny_refcoco.yaml", refcoco, tmp_path / "out")
    assert metrics["val/acc@0.5"].item() == pytest.approx(1 / 3)
    assert metrics["val/acc@0.9"].item() == pytest.approx(1 / 3)  # Ferret bins lose < 0.1 px here
    assert set(records) == {"101-0", "101-1", "102-0"}
    assert records["101-1"]["pred_box"] is None and records["101-1"]["iou"] == 0.0
    assert records["101-0"]["gt_box"] == [8.0, 8.0, 40.0, 32.0] and records["101-0"]["iou"] > 0.97
    assert records["102-0"]["prompt"] == "Give the bounding box of green box."
    assert records["102-0"]["iou"] == 0.0
    out = capsys.readouterr().out
    assert "val rec | tiny:llava | ferret | 3 samples" in out and "| acc@0.5 |   33.33 |" in out


@pytest.mark.parametrize(("merge_predicted", "recall"), [("false", 2 / 6), ("true", 3 / 6)])
def test_phrase_metric_from_fake_generations(flickr, tmp_path, monkeypatch, capsys, merge_predicted,
                                             recall):
    size = (100, 80)
    man, dog1, dog2 = (FERRET.encode(b, size) for b in ((10, 10, 40, 60), (60, 40, 80, 60), (70, 5, 90, 25)))
    _fake_generate(monkeypatch, [
        # man: hit. two dogs: two boxes; rank 1 alone misses the merged ground truth (IoU 0.24), their
        # enclosing box hits. a park: no ground truth, not counted.
        ("a man, two dogs", f"A man {man} and two dogs {dog1}, {dog2} play in a park {man}."),
        # "A person": hit; "two small dogs" found by containment ("walks two small dogs") but wrong box;
        # "the person": the one person mention went to "A person" -> nothing -> miss.
        ("a person", f"A person {man} walks two small dogs {man}."),
        ("kite", "Nothing here."),  # miss
    ])
    metrics, records = _validate(monkeypatch, "tiny_flickr30k.yaml", flickr, tmp_path / "out",
                                 f"--model.init_args.merge_predicted={merge_predicted}")
    assert metrics["val/recall@1"].item() == pytest.approx(recall)
    assert len(records["1000_0"]["pred_boxes"][1]) == (1 if merge_predicted == "true" else 2)
    assert records["1000_1"]["pred_boxes"][2] == [] and records["2000_0"]["pred_boxes"] == [[]]
    assert records["1000_0"]["gt_boxes"][2] == []
    assert "3 samples, 6 phrases" in capsys.readouterr().out


def test_flickr_validate_end_to_end_with_tiny_model(flickr, tmp_path, monkeypatch, capsys):
    metrics, records = _validate(monkeypatch, "tiny_flickr30k.yaml", flickr, tmp_path / "out")
    assert set(records) == {"1000_0", "1000_1", "2000_0"}
    assert all(isinstance(r["generation"], str) for r in records.values())
    assert 0.0 <= metrics["val/recall@1"].item() <= 1.0
    assert "| recall@1 |" in capsys.readouterr().out


def test_refcoco_validate_end_to_end_with_tiny_model(refcoco, tmp_path, monkeypatch, capsys):
    metrics, records = _validate(monkeypatch, "tiny_refcoco.yaml", refcoco, tmp_path / "out")
    assert list(records) == ["101-0", "101-1", "102-0"]
    assert {"prompt", "generation", "pred_box", "gt_box", "iou"} <= set(records["101-0"])
    assert 0.0 <= metrics["val/acc@0.5"].item() <= 1.0
    assert "| acc@0.9 |" in capsys.readouterr().out


@pytest.mark.slow
def test_refcoco_validate_command_end_to_end(refcoco, tmp_path):
    """The documented command, as a user runs it, in a fresh process (real tiny model, real generation)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spr_lightning", "validate", "--config", str(CONFIGS / "tiny_refcoco.yaml"),
           "--data.init_args.annotations", refcoco["annotations"], "--data.init_args.image_root",
           refcoco["image_root"], "--trainer.default_root_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val rec | tiny:llava | ferret | 3 samples" in proc.stdout and "| acc@0.5 |" in proc.stdout
    records = [json.loads(line) for line in (out / "predictions-rank0.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == ["101-0", "101-1", "102-0"]
    assert {"prompt", "generation", "pred_box", "gt_box", "iou"} <= set(records[0])


@pytest.mark.slow
def test_ddp_scores_every_sample_exactly_once(flickr, tmp_path):
    """Two CPU ranks (gloo): disjoint, unpadded shares; metrics and counts are global."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spr_lightning", "validate", "--config", str(CONFIGS / "tiny_flickr30k.yaml"),
           "--data.init_args.annotations", flickr["annotations"], "--data.init_args.image_root",
           flickr["image_root"], "--trainer.default_root_dir", str(out), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--data.init_args.batch_size", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [[json.loads(line)["key"] for line in (out / f"predictions-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert sorted(keys[0] + keys[1]) == ["1000_0", "1000_1", "2000_0"] and len(keys[1]) == 1
    assert proc.stdout.count("3 samples, 6 phrases") == 1  # printed once, by rank 0, with global counts


@pytest.mark.parametrize("name", ["refcoco.yaml", "flickr30k.yaml", "tiny_refcoco.yaml", "tiny_flickr30k.yaml"])
def test_eval_configs_name_real_arguments(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    for section, cls in (("model", GroundingEvaluator),
                         ("data", RefCOCODataModule if "refcoco" in name else Flickr30kEntitiesDataModule)):
        assert config[section]["class_path"] == f"{cls.__module__}.{cls.__name__}"
        assert set(config[section]["init_args"]) <= set(inspect.signature(cls).parameters)
    init = config["model"]["init_args"]
    template = init.get("prompt_template") or DEFAULT_PROMPTS[init["task"]]
    assert _template_fields(template) <= _FIELDS[init["task"]]
    get_codec(init["coord_format"], **init.get("codec_options", {}))
    tiny = name.startswith("tiny_")
    assert config["trainer"]["accelerator"] == ("cpu" if tiny else "gpu")
    assert init["dtype"] == ("float32" if tiny else "bfloat16")
    assert (init["model_name_or_path"] == "tiny:llava") == tiny

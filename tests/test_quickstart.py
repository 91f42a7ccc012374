"""The quickstart: its synthetic-world helpers (grounder, CLIP texts and export, small LLaVA) and, marked ``slow``,
the whole SPR loop end to end at the hidden ``toy`` size with every artifact loaded back."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import yaml

from spr_lightning import quickstart
from spr_lightning.shapes.clip_training import CLIPContrastiveModule, hard_negative, region_text
from spr_lightning.shapes.grounder import ShapesGrounder, classify_shape, parse_phrases
from spr_lightning.shapes.masks import shape_mask
from spr_lightning.shapes.render import render_scene
from spr_lightning.shapes.scene import SHAPES, make_scene


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


# ------------------------------------------------------------------------------------------- grounder
def test_parse_phrases_reads_attributes_per_phrase():
    phrases = parse_phrases("A small red triangle, two large blue circles and a star on a striped background.")
    assert [(p.size, p.color, p.shape) for p in phrases] == [
        ("small", "red", "triangle"), ("large", "blue", "circle"), (None, None, "star")]
    assert parse_phrases(["the green square"])[0].color == "green"
    assert parse_phrases("nothing known here") == []


@pytest.mark.parametrize("shape", SHAPES)
def test_classify_shape_recognises_clean_masks(shape):
    assert classify_shape(shape_mask(shape, 40))[0] == shape


def test_shapes_grounder_finds_the_objects_of_a_scene():
    scene = make_scene(np.random.default_rng(3))
    image = render_scene(scene)
    grounder = ShapesGrounder(image_size=scene.width)
    visible = [o for o in scene.objects if o.visible_fraction > 0.9]
    hits = 0
    for obj in visible:
        result = grounder.ground(image, f"a {obj.label}.")
        hits += any(_iou(box, obj.box) >= 0.5 for box in result.boxes.tolist())
        assert all(p == obj.label for p in (q.replace("a ", "", 1) for q in result.phrases))
    assert hits >= 0.8 * len(visible)
    # a colour that is not in the picture finds nothing
    absent = next(c for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
                  if all(o.color != c for o in scene.objects))
    assert len(grounder.ground(image, f"a {absent} circle")) == 0


def test_shapes_grounder_maps_crops_back_through_ground_batch():
    scene = make_scene(np.random.default_rng(5))
    image = render_scene(scene)
    obj = max(scene.objects, key=lambda o: (o.visible_fraction, o.box_area))
    x1, y1, x2, y2 = obj.box
    crop = image.crop((x1 - 5, y1 - 5, x2 + 5, y2 + 5))
    (result,) = ShapesGrounder(image_size=scene.width).ground_batch([crop], [obj.label])
    assert any(_iou(b, (5, 5, x2 - x1 + 5, y2 - y1 + 5)) >= 0.7 for b in result.boxes.tolist())


# ------------------------------------------------------------------------------------------------ CLIP
def test_region_text_groups_labels_in_reading_order_and_negative_changes_one_word():
    labels = ["large blue circle", "small red triangle", "large blue circle"]
    centers = [(50, 80), (10, 10), (90, 80)]
    text = region_text(labels, centers)
    assert text == "A small red triangle and two large blue circles."
    negative = hard_negative(labels, centers, np.random.default_rng(0))
    assert negative != text
    assert len(negative.split()) == len(text.split())
    assert sum(a != b for a, b in zip(negative.split(), text.split())) == 1


def test_clip_export_loads_in_the_semantic_scorer(tmp_path):
    from PIL import Image

    from spr_lightning.scoring.semantic import SemanticScorer

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "mlp_ratio": 2.0, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    module = CLIPContrastiveModule(model_config=config)
    batch = {"images": [Image.new("RGB", (40, 40), c) for c in ("red", "blue")],
             "texts": ["a red square", "a blue square"], "negatives": ["a green square", "a red square"]}
    stats = module.contrastive_step(batch)
    assert stats["loss"].ndim == 0 and torch.isfinite(stats["loss"])
    folder = module.export_model(tmp_path / "clip")
    scorer = SemanticScorer(model_name=str(folder), pretrained=None)
    expected = module.model.encode_text(module.tokenizer(["a red square"]))
    assert torch.allclose(scorer.model.encode_text(scorer.tokenizer(["a red square"])), expected, atol=1e-5)
    scores = scorer.score([Image.new("RGB", (64, 64), "red")], [(8, 8, 40, 40)], [(0, 0, 56, 56)], [["a", "b"]])
    assert scores[0]["sem"].shape == (2,)


# ------------------------------------------------------------------------------------------ small LLaVA
def test_small_llava_tokenizer_keeps_digits_apart_and_words_whole():
    from spr_lightning.tiny.small_llava import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    pieces = tokenizer.tokenize("A small red triangle [123, 456, 789, 999].")
    assert [p for p in pieces if p.isdigit()] == list("123456789999")
    assert pieces[:4] == ["A", "Ġsmall", "Ġred", "Ġtriangle"]
    # a word is the same single token wherever it stands: in a question, a description, before punctuation
    for text in ("Give the bounding box of the small red triangle.", "the red square left of the blue circle"):
        assert "Ġred" in tokenizer.tokenize(text)
    assert tokenizer.decode(tokenizer("two large blue circles")["input_ids"], skip_special_tokens=True) == \
        "two large blue circles"


def test_small_llava_tokenizer_without_word_split_merges_across_words():
    from spr_lightning.tiny.small_llava import build_shapes_tokenizer

    fused = build_shapes_tokenizer(split_words=False).tokenize("Give the bounding box of the small red triangle.")
    assert "Ġred" not in fused and any("Ġ" in p.strip("Ġ") for p in fused)  # some token spans two words


def test_small_llava_saves_and_loads_by_path(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from spr_lightning.tiny.small_llava import build_small_llava

    path = build_small_llava(tmp_path / "m", image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                             text_hidden=64, text_layers=1)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.vision_config.image_size == 32
    from PIL import Image

    inputs = processor(text=["<image>\nWhere?"], images=[Image.new("RGB", (224, 224))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # (32 / 16) ** 2 patches


# ---------------------------------------------------------------------------------------------- plumbing
def test_write_config_applies_dotted_overrides(tmp_path):
    out = quickstart.write_config("dpo.yaml", tmp_path / "dpo.yaml", {
        "trainer.max_steps": 3, "trainer.callbacks[0].init_args.dirpath": "x/adapter", "model.init_args.lr": 0.1})
    config = yaml.safe_load(out.read_text())
    assert config["trainer"]["max_steps"] == 3
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "x/adapter"
    assert config["model"]["init_args"]["lr"] == 0.1
    assert config["model"]["class_path"] == "spr_lightning.dpo.DPOModule"


def test_accelerator_reaches_every_stage_config_and_a_bad_one_is_refused(tmp_path):
    run = quickstart.Run(tmp_path, "toy", accelerator="gpu")
    config = yaml.safe_load(run.config("sft", "sft.yaml", {"trainer.max_steps": 2}).read_text())
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["max_steps"] == 2
    default = quickstart.Run(tmp_path / "cpu", "toy").config("dpo", "dpo.yaml", {})
    assert yaml.safe_load(default.read_text())["trainer"]["accelerator"] == "cpu"
    with pytest.raises(ValueError, match="accelerator must be one of"):
        quickstart.run_quickstart(tmp_path / "x", "toy", accelerator="tpu")
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(tmp_path / "y"), "--accelerator", "tpu"])


def test_an_unknown_size_is_refused_before_anything_is_written(tmp_path):
    assert quickstart.size_by_name("small") is quickstart.SIZES["small"]
    with pytest.raises(ValueError, match=r"size must be one of \['full', 'small', 'toy'\], got 'huge'"):
        quickstart.Run(tmp_path / "r", "huge")
    with pytest.raises(ValueError, match="got 'huge'"):
        quickstart.run_quickstart(tmp_path / "q", "huge")
    assert not (tmp_path / "q").exists()


def test_until_stops_after_its_stage_and_a_later_run_goes_on(tmp_path, capsys):
    out = tmp_path / "qs"
    with pytest.raises(ValueError, match="until must be one of"):
        quickstart.run_quickstart(out, "toy", until="pairs")
    assert not out.exists()
    quickstart.main(["--out", str(out), "--size", "toy", "--until", "world"])
    assert (out / "world" / "DONE").is_file() and not (out / "vision").exists()
    printed = capsys.readouterr().out
    assert "stopped after world (--until world)" in printed and "go on from vision" in printed
    assert "REC Acc" not in printed  # no report of stages that did not run
    quickstart.main(["--out", str(out), "--size", "toy", "--until", "world"])
    assert "world: done already" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(out), "--until", "pairs"])


def test_parse_overrides_reads_yaml_values_and_names_what_is_wrong():
    parsed = quickstart.parse_overrides(["sft:model.init_args.lr=5e-4", "sft:data.init_args.batch_size=32",
                                         "*:trainer.enable_progress_bar=false"])
    assert parsed == {"sft": {"model.init_args.lr": 5e-4, "data.init_args.batch_size": 32},
                      "*": {"trainer.enable_progress_bar": False}}
    with pytest.raises(ValueError, match="expected CONFIG:dotted.key=value"):
        quickstart.parse_overrides(["sft.model.init_args.lr=5e-4"])
    with pytest.raises(ValueError, match="expected CONFIG:dotted.key=value"):
        quickstart.parse_overrides(["sft:model.init_args.lr"])
    with pytest.raises(ValueError, match="no config named 'sfft'"):
        quickstart.parse_overrides(["sfft:model.init_args.lr=1"])


def test_set_overrides_win_over_the_stage_and_reach_only_their_config(tmp_path):
    run = quickstart.Run(tmp_path, "toy", overrides={"sft": {"trainer.max_steps": 7, "model.init_args.lr": 5e-4},
                                                     "*": {"trainer.log_every_n_steps": 3}})
    sft = yaml.safe_load(run.config("sft", "sft.yaml", {"trainer.max_steps": 2}).read_text())
    assert sft["trainer"]["max_steps"] == 7 and sft["model"]["init_args"]["lr"] == 5e-4
    assert sft["trainer"]["log_every_n_steps"] == 3
    dpo = yaml.safe_load(run.config("dpo", "dpo.yaml", {"trainer.max_steps": 2}).read_text())
    assert dpo["trainer"]["max_steps"] == 2 and dpo["trainer"]["log_every_n_steps"] == 3
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(tmp_path / "y"), "--set", "nothing:a=1"])


def test_every_quickstart_config_parses():
    from spr_lightning.cli import cli_main

    for path in sorted(quickstart.CONFIG_DIR.glob("*.yaml")):
        subcommand = {"clip": "fit", "sft": "fit", "dpo": "fit", "generate": "predict", "score": "predict"}.get(
            path.stem, "validate")
        with pytest.raises(SystemExit) as exit_info:
            cli_main([subcommand, "--config", str(path), "--print_config"])
        assert exit_info.value.code == 0, path


def test_metric_rows_and_table():
    results = {"rec_sft": {f"acc@{t}": 0.1 for t in quickstart.REC_THRESHOLDS},
               "rec_spr": {f"acc@{t}": 0.2 for t in quickstart.REC_THRESHOLDS},
               "phrase_sft": {"recall@1": 0.3}, "phrase_spr": {"recall@1": 0.25}}
    rows = quickstart.metric_rows(results)
    assert rows[0] == ("REC Acc@0.5", pytest.approx(10.0), pytest.approx(20.0))
    assert rows[-1][0] == "Phrase Recall@1"
    table = quickstart.format_table(rows, "title")
    assert "+10.0" in table and "-5.0" in table


def test_an_interrupted_sft_stage_resumes_from_its_last_checkpoint(tmp_path):
    import csv

    every = {"trainer.callbacks[1].init_args.every_n_train_steps": 1, "trainer.log_every_n_steps": 1}
    first = quickstart.Run(tmp_path, "toy", overrides={"sft": {**every, "trainer.max_steps": 2}})
    for stage in ("world", "vision", "base"):
        quickstart.STAGE_FUNCTIONS[stage](first)
    # a run killed after step 2: what `fit` leaves behind before the stage can finish
    quickstart.run_cli("fit", first.config("sft", "sft.yaml", {
        **quickstart.fit_overrides(first, "sft", 2),
        "model.init_args.model_name_or_path": str(first.path("base", "model")),
        "data.init_args.train_file": str(first.path("world", "sft_quickstart_train.jsonl")),
        "data.init_args.image_root": str(first.path("world")), "data.init_args.batch_size": 2,
    }))  # fmt: skip
    assert (tmp_path / "sft" / "checkpoints" / "last.ckpt").is_file()
    again = quickstart.Run(tmp_path, "toy", overrides={"sft": {**every, "trainer.max_steps": 4}})
    quickstart.clear_stage(again, "sft")
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["checkpoints", "logs"]  # logs: the first part's
    quickstart.stage_sft(again)

    def logged_steps(version: str) -> list[int]:
        rows = csv.DictReader(open(tmp_path / "sft" / "logs" / version / "metrics.csv"))
        return sorted({int(r["step"]) for r in rows if r.get("train/loss")})

    assert logged_steps("version_0") == [0, 1]  # the interrupted part's metrics are kept
    assert logged_steps("version_1") == [2, 3]  # steps 0-1 not trained again
    assert (tmp_path / "sft" / "model" / "final" / "config.json").is_file()
    assert not (tmp_path / "sft" / "checkpoints").exists()  # deleted once the stage is done
    # a stage folder that is a symlink to another run's is left alone, as rmtree leaves it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "kept.txt").write_text("x")
    (tmp_path / "clip").symlink_to(tmp_path / "other")
    quickstart.clear_stage(again, "clip")
    assert (tmp_path / "other" / "kept.txt").is_file()
    # without a checkpoint to resume from, a stage starts over and its old logs go
    (tmp_path / "vision" / "logs" / "version_0").mkdir(parents=True, exist_ok=True)
    assert not (tmp_path / "vision" / "checkpoints").exists()
    quickstart.clear_stage(again, "vision")
    assert not (tmp_path / "vision" / "logs").exists()


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quickstart_toy_end_to_end(tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, CLIPVisionModel

    from spr_lightning.scoring.semantic import SemanticScorer

    out = tmp_path / "qs"
    monkeypatch.chdir(tmp_path)
    quickstart.main(["--out", str(out), "--size", "toy"])
    assert not (tmp_path / "config.yaml").exists()  # every stage writes its CLI config into the run folder
    for stage in quickstart.STAGES:
        assert (out / stage / "DONE").is_file(), stage
    world = json.loads((out / "world" / "world.json").read_text())
    assert world["num_images"] == quickstart.SIZES["toy"].world
    sft_lines = [json.loads(line) for line in (out / "world" / "sft_quickstart_train.jsonl").read_text().splitlines()]
    warm = [r for r in sft_lines if r["image"].startswith("warmup_1/")]
    assert warm and all(r["task"] == "rec" and (out / "world" / r["image"]).is_file() for r in warm)
    tower = CLIPVisionModel.from_pretrained(out / "vision" / "model" / "final")
    base = AutoModelForImageTextToText.from_pretrained(out / "base" / "model")
    assert torch.equal(base.model.vision_tower.embeddings.patch_embedding.weight,
                       tower.embeddings.patch_embedding.weight)  # the LLaVA starts from the pretrained tower
    SemanticScorer(model_name=str(out / "clip" / "model" / "final"), pretrained=None)
    sft = AutoModelForImageTextToText.from_pretrained(out / "sft" / "model" / "final")
    for folder, prefix in ((out / "generate" / "candidates", "candidates"), (out / "score" / "pairs", "pairs")):
        shards = sorted(folder.glob(f"{prefix}-*.tar"))
        assert shards, folder
        with tarfile.open(shards[0]) as tar:
            record = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))))
        assert ("chosen" in record and "rejected" in record) if prefix == "pairs" else record["candidates"]
    PeftModel.from_pretrained(sft, out / "dpo" / "adapter" / "final")
    assert (sorted((out / "dpo" / "logs").glob("version_*/metrics.csv")))
    for name in ("rec_sft", "rec_spr", "phrase_sft", "phrase_spr"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert ("acc@0.5" in metrics) if name.startswith("rec") else ("recall@1" in metrics)
    assert (out / "quickstart.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "REC Acc@0.9" in printed and "Phrase Recall@1" in printed
    # a second run reuses every finished stage
    before = {s: (out / s / "DONE").stat().st_mtime_ns for s in quickstart.STAGES}
    quickstart.main(["--out", str(out), "--size", "toy"])
    assert before == {s: (out / s / "DONE").stat().st_mtime_ns for s in quickstart.STAGES}
    assert capsys.readouterr().out.count("done already") == len(quickstart.STAGES)


@pytest.mark.gpu
def test_quickstart_toy_end_to_end_on_gpu(tmp_path):
    """The same loop with every stage on the CUDA device (``--accelerator gpu``)."""
    out = tmp_path / "qs"
    quickstart.main(["--out", str(out), "--size", "toy", "--accelerator", "gpu"])
    for stage in quickstart.STAGES:
        assert (out / stage / "DONE").is_file(), stage
    config = yaml.safe_load((out / "configs" / "sft.yaml").read_text())
    assert config["trainer"]["accelerator"] == "gpu"
    metrics = json.loads((out / "eval" / "rec_spr" / "metrics.json").read_text())
    assert 0.0 <= metrics["acc@0.5"] <= 1.0

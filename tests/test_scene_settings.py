"""Scene settings of SPR-Shapes (``--scene``): one place that validates them, and every stage that draws or reads
scenes (world, warm-up scenes, the tower's pretraining scenes, the ShapesGrounder's size bands) uses the world's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from spr_lightning import quickstart
from spr_lightning.shapes import SceneConfig, scene_config, vision_pretraining
from spr_lightning.shapes.grounder import ShapesGrounder

LARGER = {"small_side": [0.14, 0.18], "large_side": [0.26, 0.34], "max_objects": 12}


def test_scene_config_reads_lists_and_refuses_unknown_or_bad_settings():
    config = scene_config(224, LARGER)
    assert config.small_side == (0.14, 0.18) and config.large_side == (0.26, 0.34) and config.max_objects == 12
    assert config.side_range("small") == (31, 40) and config.side_range("large") == (58, 76)
    assert scene_config(224, None) == SceneConfig(image_size=224)
    with pytest.raises(ValueError, match=r"unknown scene setting\(s\) \['big_side'\]"):
        scene_config(224, {"big_side": [0.1, 0.2]})
    with pytest.raises(ValueError, match="unknown scene setting"):
        scene_config(224, {"image_size": 320})  # given separately
    with pytest.raises(ValueError, match="must start at least 1.4x above"):
        scene_config(224, {"small_side": [0.2, 0.25]})


def test_grounder_size_bands_follow_the_scene():
    default, larger = ShapesGrounder(image_size=224), ShapesGrounder(image_size=224, scene=LARGER)
    assert default.size_split == pytest.approx((28 + 43) / 2)
    assert larger.size_split == pytest.approx((40 + 58) / 2)


def test_tower_pretraining_draws_the_world_s_scenes(monkeypatch):
    seen = []
    original = vision_pretraining.render_dense_sample

    def spy(seed, index, image_size, grid, config):
        seen.append(config)
        return original(seed, index, image_size, grid, config)

    monkeypatch.setattr(vision_pretraining, "render_dense_sample", spy)
    data = vision_pretraining.ShapesDenseDataModule(num_train=2, num_val=0, image_size=32, patch_size=16,
                                                    batch_size=2, scene=LARGER)
    data.setup("fit")
    assert seen and all(c == scene_config(224, LARGER) for c in seen)


def test_parse_scene_reads_yaml_values_and_reports_mistakes():
    assert quickstart.parse_scene(["small_side=[0.1, 0.12]", "max_objects=12"]) == {
        "small_side": [0.1, 0.12], "max_objects": 12}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        quickstart.parse_scene(["small_side"])
    with pytest.raises(ValueError, match="unknown scene setting"):
        quickstart.parse_scene(["smal_side=[0.1, 0.12]"])


def _toy_world(tmp_path: Path, scene: dict | None) -> quickstart.Run:
    run = quickstart.Run(tmp_path / "qs", "toy", scene=scene)
    info = quickstart.stage_world(run)
    run.mark_done("world", {"info": info})
    return run


def test_world_keeps_its_scene_and_later_stages_read_it(tmp_path, monkeypatch):
    run = _toy_world(tmp_path, LARGER)
    assert json.loads(run.path("world", "scene.json").read_text()) == LARGER
    assert quickstart.world_scene(run) == LARGER
    annotations = json.loads(run.path("world", "annotations", "instances_train.json").read_text())
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in annotations["annotations"]]
    assert sides and min(sides) >= 31  # the default world has 20 px objects
    # a run that resumes without --scene reads the world's settings (here a fresh Run object, no scene given)
    resumed = quickstart.Run(run.root, "toy")
    configs = {}

    def fake_fit(run_, stage, config):
        configs[stage] = yaml.safe_load(Path(config).read_text())

    def fake_cli(subcommand, config, ckpt_path=None):
        configs["score"] = yaml.safe_load(Path(config).read_text())
        return SimpleNamespace(model=SimpleNamespace(summary={"pairs": 1.0}))

    monkeypatch.setattr(quickstart, "fit_stage", fake_fit)
    monkeypatch.setattr(quickstart, "run_cli", fake_cli)
    quickstart.stage_vision(resumed)
    quickstart.stage_score(resumed)
    assert configs["vision"]["data"]["init_args"]["scene"] == LARGER
    assert configs["score"]["model"]["init_args"]["grounder"]["init_args"]["scene"] == LARGER


def test_default_world_writes_no_scene_into_later_configs(tmp_path, monkeypatch):
    run = _toy_world(tmp_path, None)
    assert quickstart.world_scene(run) == {}
    configs = {}
    monkeypatch.setattr(quickstart, "fit_stage",
                        lambda run_, stage, config: configs.update(vision=yaml.safe_load(Path(config).read_text())))
    quickstart.stage_vision(run)
    assert "scene" not in configs["vision"]["data"]["init_args"]


def test_a_made_world_refuses_other_scene_settings(tmp_path):
    run = _toy_world(tmp_path, LARGER)
    quickstart.check_world_scene(run.root, LARGER)  # the same: fine
    quickstart.check_world_scene(run.root, None)  # none given: the world's are used
    quickstart.check_world_scene(run.root, {}, redo="world")  # remade
    with pytest.raises(ValueError, match="was made with scene .* drop --scene"):
        quickstart.check_world_scene(run.root, {})
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(run.root), "--size", "toy", "--scene", "max_objects=11"])


def test_model_flag_changes_the_base_language_model_and_guards_a_built_one(tmp_path, monkeypatch):
    assert quickstart.parse_model(["text_hidden=256", "text_layers=4"]) == {"text_hidden": 256, "text_layers": 4}
    for bad, message in ((["vision_layers=4"], "KEY one of text_hidden, text_layers"),
                         (["text_hidden=wide"], "must be a whole number"), (["text_hidden=100"], "multiple of 32"),
                         (["text_layers=0"], "text_layers must be >= 1")):
        with pytest.raises(ValueError, match=message):
            quickstart.parse_model(bad)
    run = quickstart.Run(tmp_path / "qs", "toy", model={"text_hidden": 96})
    assert run.size.model == {"text_hidden": 96, "text_layers": 1}  # toy's depth kept
    assert quickstart.size_by_name("toy").model == {"text_hidden": 64, "text_layers": 1}  # the preset untouched
    built = {}
    monkeypatch.setattr("spr_lightning.tiny.small_llava.build_small_llava",
                        lambda out, **kwargs: built.update(kwargs))
    run.mark_done("base", {"info": quickstart.build_base(run)})
    assert built["text_hidden"] == 96 and built["text_layers"] == 1
    quickstart.check_base_model(run.root, "toy", {"text_hidden": 96})  # the same: fine
    quickstart.check_base_model(run.root, "toy", None)
    quickstart.check_base_model(run.root, "toy", {"text_hidden": 128}, redo="vision")  # rebuilt
    with pytest.raises(ValueError, match="holds a model built with .* --redo base"):
        quickstart.check_base_model(run.root, "toy", {"text_hidden": 128})
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(run.root), "--size", "toy", "--model", "text_layers=2"])


def test_vision_flag_changes_the_tower_and_guards_a_built_one(tmp_path, monkeypatch):
    from spr_lightning.tiny.small_llava import small_vision_config

    assert quickstart.parse_vision(["image_size=144", "num_layers=4"]) == {"image_size": 144, "num_layers": 4}
    for bad, message in ((["text_layers=4"], "KEY one of image_size, patch_size"),
                         (["image_size=big"], "must be a whole number"), (["patch_size=0"], "must be >= 1"),
                         (["hidden_size=100"], "multiple of 32")):
        with pytest.raises(ValueError, match=message):
            quickstart.parse_vision(bad)
    run = quickstart.Run(tmp_path / "qs", "toy", vision={"image_size": 48})
    assert run.size.vision == {"image_size": 48, "patch_size": 16, "hidden_size": 32, "num_layers": 1}
    assert quickstart.size_by_name("toy").vision["image_size"] == 32  # the preset untouched
    configs = {}
    monkeypatch.setattr(quickstart, "fit_stage",
                        lambda run_, stage, config: configs.update(vision=yaml.safe_load(Path(config).read_text())))
    info = quickstart.stage_vision(run)
    assert configs["vision"]["model"]["init_args"]["image_size"] == 48
    assert configs["vision"]["data"]["init_args"]["image_size"] == 48
    assert info["tower"]["image_size"] == 48
    with pytest.raises(ValueError, match="image_size 40 must be a multiple of patch_size 16"):
        quickstart.check_vision_tower(run.root, "toy", {"image_size": 40})
    quickstart.check_vision_tower(run.root, "toy", {"image_size": 64})  # nothing built yet: fine
    # A finished vision stage: its exported tower's config.json is the record checked against.
    small_vision_config(48, 16, 32, 1).save_pretrained(run.path("vision", "model", "final"))
    run.mark_done("vision", {"info": info})
    assert quickstart.built_tower_shape(run.root) == run.size.vision
    quickstart.check_vision_tower(run.root, "toy", {"image_size": 48})  # the same: fine
    quickstart.check_vision_tower(run.root, "toy", None)
    quickstart.check_vision_tower(run.root, "toy", {"image_size": 64}, redo="vision")  # retrained
    with pytest.raises(ValueError, match="holds a tower built with .* --redo vision"):
        quickstart.check_vision_tower(run.root, "toy", {"image_size": 64}, redo="sft")
    with pytest.raises(SystemExit):
        quickstart.main(["--out", str(run.root), "--size", "toy", "--vision", "image_size=64"])

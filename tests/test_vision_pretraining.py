"""Dense vision-tower pretraining on SPR-Shapes (spr_lightning.shapes.vision_pretraining)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from transformers import CLIPVisionModel

from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES, Background, Scene, ShapeObject
from spr_lightning.shapes.vision_pretraining import (
    NUM_COLOR_CLASSES,
    NUM_SHAPE_CLASSES,
    ShapesDenseDataModule,
    VisionPretrainModule,
    dense_targets,
)
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, make_small_llava


def _square(x: int, y: int, side: int, color: str) -> ShapeObject:
    return ShapeObject("square", color, "small", (x, y), side, (x, y, x + side, y + side), COLORS[color])


def test_dense_targets_by_hand() -> None:
    # 128 px, 4 x 4 grid of 32 px cells; patch centres at 16, 48, 80, 112.
    lower = _square(0, 0, 40, "red")  # covers centres (16, 16); box centre (20, 20) -> cell (0, 0)
    upper = _square(10, 10, 20, "blue")  # drawn on top: owns (16, 16); box centre (20, 20) -> cell (0, 0) too
    far = _square(70, 70, 30, "green")  # covers (80, 80); box centre (85, 85) -> cell (2, 2)
    scene = Scene(128, 128, Background("gradient", ((100, 100, 100), (120, 120, 120)), 0), (lower, upper, far))
    t = dense_targets(scene, 4)
    colors, square = list(COLORS), 1 + SHAPES.index("square")
    assert t.color.shape == (16,) and t.box.shape == (16, 4)
    assert t.color[0] == 1 + colors.index("blue")  # top object at the patch centre wins
    assert t.color[2 * 4 + 2] == 1 + colors.index("green")
    assert t.color[1] == 0 and t.shape[1] == 0  # (48, 16) is background: the red square ends at x = 40
    assert t.shape[0] == square and t.shape[10] == square
    assert t.center.nonzero()[0].tolist() == [0, 10]
    np.testing.assert_allclose(t.box[0], np.array([10, 10, 30, 30]) / 128)  # the later (upper) object's box
    np.testing.assert_allclose(t.box[10], np.array([70, 70, 100, 100]) / 128)
    assert not t.box[[1, 5, 15]].any()
    np.testing.assert_allclose(t.object_box[0], np.array([10, 10, 30, 30]) / 128)  # top object at the centre
    np.testing.assert_allclose(t.object_box[10], np.array([70, 70, 100, 100]) / 128)
    assert not t.object_box[t.color == 0].any()  # background patches carry no box
    assert (t.object_box.any(axis=1) == (t.color > 0)).all()
    small = SIZES.index("small")  # the centre object's attributes sit with its box: the upper (blue) one at 0
    assert t.center_attributes[0].tolist() == [colors.index("blue"), SHAPES.index("square"), small]
    assert t.center_attributes[10].tolist() == [colors.index("green"), SHAPES.index("square"), small]
    assert not t.center_attributes[t.center == 0].any()


def test_data_module_is_deterministic_and_shaped() -> None:
    a = ShapesDenseDataModule(num_train=3, num_val=2, image_size=32, patch_size=16, batch_size=2, scene_seed=5)
    b = ShapesDenseDataModule(num_train=3, num_val=2, image_size=32, patch_size=16, batch_size=2, scene_seed=5)
    a.setup("fit")
    b.setup("fit")
    images, color, shape, center, box, object_box, center_attributes = a.train_set.tensors
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert color.shape == shape.shape == center.shape == (3, 4) and box.shape == object_box.shape == (3, 4, 4)
    assert int(color.max()) < NUM_COLOR_CLASSES and int(shape.max()) < NUM_SHAPE_CLASSES
    assert center.sum() > 0 and center_attributes.shape == (3, 4, 3)
    assert not center_attributes[center == 0].any()
    for x, y in zip(a.train_set.tensors, b.train_set.tensors):
        assert torch.equal(x, y)
    assert not torch.equal(a.train_set.tensors[0][:2], a.val_set.tensors[0])  # val scenes are other scenes
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ShapesDenseDataModule(image_size=30, patch_size=16)


def test_pretraining_learns_and_exports_a_tower_the_llava_loads(tmp_path) -> None:
    pl.seed_everything(0)
    data = ShapesDenseDataModule(num_train=16, num_val=0, image_size=32, patch_size=16, batch_size=8, scene_seed=3)
    module = VisionPretrainModule(image_size=32, patch_size=16, hidden_size=32, num_layers=1, lr=3e-3)
    data.setup("fit")
    batch = list(data.train_set.tensors)
    with torch.no_grad():
        before = float(module._losses(batch)["loss"])
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        after = float(module._losses(batch)["loss"])
    assert after < 0.7 * before
    tower_dir = module.export_model(tmp_path / "tower")
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    model, processor = make_small_llava(vision_tower=tower_dir, text_hidden=64, text_layers=1,
                                        location_tokens=MINIGPT_V2_TOKENS)
    assert model.config.vision_feature_layer == -1 and model.config.vision_config.image_size == 32
    for name, value in tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name
    tokens = processor.tokenizer.tokenize("{<12><40><100><0>}")
    assert tokens == ["{", "<12>", "<40>", "<100>", "<0>", "}"]


def test_object_box_term_counts_only_with_its_weight() -> None:
    data = ShapesDenseDataModule(num_train=4, num_val=0, image_size=32, patch_size=16, batch_size=4, scene_seed=2)
    data.setup("fit")
    batch = list(data.train_set.tensors)
    off = VisionPretrainModule(image_size=32, patch_size=16, hidden_size=32, num_layers=1, seed=1)
    on = VisionPretrainModule(image_size=32, patch_size=16, hidden_size=32, num_layers=1, seed=1, object_box_weight=2.0)
    with torch.no_grad():
        loss_off, loss_on = off._losses(batch), on._losses(batch)
    assert float(loss_on["object_box_l1"]) > 0
    assert float(loss_on["loss"]) == pytest.approx(float(loss_off["loss"]) + 2.0 * float(loss_on["object_box_l1"]),
                                                   rel=1e-5)


def test_center_attribute_term_counts_only_with_its_weight_and_is_learned() -> None:
    pl.seed_everything(0)
    data = ShapesDenseDataModule(num_train=16, num_val=0, image_size=32, patch_size=16, batch_size=8, scene_seed=3)
    data.setup("fit")
    batch = list(data.train_set.tensors)
    off = VisionPretrainModule(image_size=32, patch_size=16, hidden_size=32, num_layers=1, seed=1)
    on = VisionPretrainModule(image_size=32, patch_size=16, hidden_size=32, num_layers=1, seed=1, lr=3e-3,
                              center_attribute_weight=2.0)
    with torch.no_grad():
        loss_off, loss_on = off._losses(batch), on._losses(batch)
    assert float(loss_on["center_attributes"]) > 0
    assert float(loss_on["loss"]) == pytest.approx(
        float(loss_off["loss"]) + 2.0 * float(loss_on["center_attributes"]), rel=1e-5)
    trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(on, datamodule=data)
    with torch.no_grad():
        after = on._losses(batch)
    assert float(after["center_attributes"]) < 0.7 * float(loss_on["center_attributes"])
    assert float(after["center_size_accuracy"]) > 0.8


def test_too_few_scenes_for_a_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_train >= batch_size"):
        ShapesDenseDataModule(num_train=8, batch_size=32)

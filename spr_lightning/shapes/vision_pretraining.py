"""Teach the small LLaVA's vision tower to see SPR-Shapes before SFT: dense per-patch supervision.

A real LLaVA starts from a CLIP tower pretrained on hundreds of millions of images; its SFT only has to connect
features that already encode objects and where they are to words. A randomly initialised tower trained only
through the language model's answer loss does not get there on a CPU: measured on SPR-Shapes, the small LLaVA
learns the answer format and the coordinate prior, and its answers stop depending on the image at all (the
projector's output collapses to one vector, shuffling the images changes the SFT loss by 1e-5).

So the quickstart pretrains the tower first, the way detection backbones are pretrained on box annotations
(dense prediction heads on the patch tokens, as in ViTDet / OWL-ViT style heads), on scenes drawn fresh from the
world's generator. Every patch token of the layer LLaVA reads (the last one: ``vision_feature_layer = -1``)
predicts:

* the colour and the shape of the object on top at the patch's centre pixel (or background);
* whether the centre of some object's box falls in the patch, and if so that box, as fractions of the image
  (the top-most object when several centres share a patch);
* optionally (``center_attribute_weight > 0``, off by default) that centre object's colour, shape and size, so
  that one token per object says both *what* it is and *where* (CenterNet-style: class and box at the object's
  centre);
* optionally (``object_box_weight > 0``, off by default) the box of the object on top at the patch's centre pixel,
  on every patch an object covers ("object box", as FCOS-style dense detectors regress the box from every location
  inside it).

Why the object box exists and why it is off: to answer "where is the small red circle?" the LLaVA's language model
attends to the patches whose features say *red circle* and reads a box from them; with the box on the centre patch
only, attention spread over an object's patches mixes in patches that carry none. Measured at the quickstart's
``full`` size (2026-11-26, same world, recipe and seeds otherwise), weight 10 made the tower worse at shapes
(validation 44% vs 60%) and the SFT start worse at REC (Acc@0.5 4.5% vs 9.2%, training loss 1.04 vs 0.84 at the
end), so the default keeps the centre-patch box only.

Why the centre attributes exist and why they are off: the colour/shape targets belong to whatever covers the
patch's centre pixel, which for a small object is often the background or a neighbour. A linear probe of the
``full`` tower's token at each object's box centre (600 fresh scenes, 7 473 objects) reads the object's colour 86%,
shape 48% and size 90% of the time; with ``center_attribute_weight: 1`` 90%, 68% and 93%. But the SFT start built
on that tower was worse (2026-11-26, ``full`` recipe otherwise unchanged: REC Acc@0.5 5.1% vs 9.2%, training loss
0.97 vs 0.84 at the end), like the object box before it: cleaner object tokens are not what the language model
lacks (``docs/results.md``).

Colour and shape make the features say *what* is there; the box makes them say *where*, to sub-patch precision,
which is what REC at IoU 0.9 needs. The heads are dropped on export: :meth:`VisionPretrainModule.export_model`
writes a plain ``CLIPVisionModel`` (``save_pretrained``) that
:func:`spr_lightning.tiny.small_llava.build_small_llava` loads as the LLaVA's tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from spr_lightning.shapes.render import render_scene
from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES, Scene, SceneConfig, make_scene, owner_map, scene_config
from spr_lightning.training import adamw_cosine

__all__ = [
    "DenseTargets",
    "ShapesDenseDataModule",
    "VisionPretrainModule",
    "dense_targets",
    "render_dense_sample",
]

_COLOR_NAMES = tuple(COLORS)
#: Output channels of the dense head: colours + background, shapes + background, box-centre logit, box, object box,
#: then the centre object's colour, shape and size (no background class: only scored where a centre is).
NUM_COLOR_CLASSES = len(_COLOR_NAMES) + 1
NUM_SHAPE_CLASSES = len(SHAPES) + 1
_CENTER_CLASSES = (len(_COLOR_NAMES), len(SHAPES), len(SIZES))
HEAD_WIDTH = NUM_COLOR_CLASSES + NUM_SHAPE_CLASSES + 1 + 4 + 4 + sum(_CENTER_CLASSES)
#: CLIP's normalisation (the LLaVA's ``CLIPImageProcessor`` uses the same constants).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DenseTargets:
    """Per-patch targets of one image on a ``grid x grid`` patch grid (row-major, like the ViT's tokens).

    Attributes:
        color: ``[grid * grid]`` class of the top object at the patch centre (0: background, ``1 + index`` in
            :data:`~spr_lightning.shapes.scene.COLORS`).
        shape: the same for its shape (``1 + index`` in :data:`~spr_lightning.shapes.scene.SHAPES`).
        center: ``[grid * grid]`` 1.0 where an object's box centre falls in the patch.
        box: ``[grid * grid, 4]`` that object's ``x1, y1, x2, y2`` as fractions of the image (0 elsewhere).
        object_box: ``[grid * grid, 4]`` the box of the top object at the patch centre, as fractions of the image
            (0 where ``color`` is background).
        center_attributes: ``[grid * grid, 3]`` colour, shape and size (indices in :data:`COLORS`,
            :data:`SHAPES`, :data:`SIZES`) of the object whose box centre falls in the patch, the same object
            ``box`` holds (0 where ``center`` is 0).
    """

    color: np.ndarray
    shape: np.ndarray
    center: np.ndarray
    box: np.ndarray
    object_box: np.ndarray
    center_attributes: np.ndarray


def dense_targets(scene: Scene, grid: int) -> DenseTargets:
    """The :class:`DenseTargets` of ``scene`` on a ``grid x grid`` patch grid."""
    owner = owner_map(scene)
    height, width = owner.shape
    color = np.zeros((grid, grid), np.int64)
    shape = np.zeros((grid, grid), np.int64)
    ys = ((np.arange(grid) + 0.5) * height / grid).astype(int)
    xs = ((np.arange(grid) + 0.5) * width / grid).astype(int)
    top = owner[np.ix_(ys, xs)]
    object_box = np.zeros((grid, grid, 4), np.float32)
    for k, obj in enumerate(scene.objects):
        on_top = top == k
        color[on_top] = 1 + _COLOR_NAMES.index(obj.color)
        shape[on_top] = 1 + SHAPES.index(obj.shape)
        x1, y1, x2, y2 = obj.box
        object_box[on_top] = (x1 / width, y1 / height, x2 / width, y2 / height)
    center = np.zeros((grid, grid), np.float32)
    box = np.zeros((grid, grid, 4), np.float32)
    attributes = np.zeros((grid, grid, 3), np.int64)
    for obj in scene.objects:  # drawn bottom to top: a later (higher) object overwrites a shared patch
        x1, y1, x2, y2 = obj.box
        gx = min(int((x1 + x2) / 2 / width * grid), grid - 1)
        gy = min(int((y1 + y2) / 2 / height * grid), grid - 1)
        center[gy, gx] = 1.0
        box[gy, gx] = (x1 / width, y1 / height, x2 / width, y2 / height)
        attributes[gy, gx] = (_COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape), SIZES.index(obj.size))
    return DenseTargets(color.reshape(-1), shape.reshape(-1), center.reshape(-1), box.reshape(-1, 4),
                        object_box.reshape(-1, 4), attributes.reshape(-1, 3))


def render_dense_sample(seed: int, index: int, image_size: int, grid: int,
                        scene_config: SceneConfig | None = None) -> tuple[np.ndarray, DenseTargets]:
    """Scene ``index`` of the stream ``seed``: the ``[image_size, image_size, 3]`` uint8 image as the tower sees
    it (rendered at the world's size, resized bicubic like ``CLIPImageProcessor``) and its targets."""
    scene = make_scene(np.random.default_rng([seed, index]), scene_config)
    image = render_scene(scene).resize((image_size, image_size), resample=3)  # PIL.Image.BICUBIC
    return np.asarray(image, dtype=np.uint8), dense_targets(scene, grid)


class ShapesDenseDataModule(LightningDataModule):
    """Fresh SPR-Shapes scenes with dense targets, drawn once in ``setup`` and kept in memory (uint8).

    Scenes come from their own seed stream (``scene_seed``, default 1000), not the world's split seeds, so the tower
    never sees the REC/phrase test images; 4 000 scenes at 96 px take about 8 s to draw and 110 MB.

    Args:
        num_train: training scenes.
        num_val: validation scenes (colour/shape accuracy, box error in pixels of the tower's input).
        image_size: the tower's input side in pixels.
        patch_size: the tower's patch side (``image_size / patch_size`` patches per side).
        batch_size: scenes per step.
        scene_seed: seed of the scene stream.
        world_size: side of the rendered scenes before resizing (the world's ``image_size``).
        scene: the world's scene settings when they are not the defaults (:func:`~spr_lightning.shapes.scene.
            scene_config`), so that the tower learns on scenes like the world's.
    """

    def __init__(self, num_train: int = 4000, num_val: int = 200, image_size: int = 96, patch_size: int = 12,
                 batch_size: int = 32, scene_seed: int = 1000, world_size: int = 224,
                 scene: dict[str, Any] | None = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if num_train < batch_size or num_val < 0:
            raise ValueError(f"need num_train >= batch_size (full batches only) and num_val >= 0, got num_train "
                             f"{num_train}, batch_size {batch_size}, num_val {num_val}")
        self.save_hyperparameters()
        self.grid = image_size // patch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _draw(self, start: int, count: int) -> TensorDataset:
        hp = self.hparams
        config = scene_config(hp.world_size, hp.scene)
        samples = [render_dense_sample(hp.scene_seed, start + i, hp.image_size, self.grid, config)
                   for i in range(count)]
        images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).contiguous()

        def stack(name: str) -> Tensor:
            return torch.from_numpy(np.stack([getattr(s[1], name) for s in samples]))

        return TensorDataset(images, stack("color"), stack("shape"), stack("center"), stack("box"),
                             stack("object_box"), stack("center_attributes"))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._draw(0, self.hparams.num_train)
            self.val_set = self._draw(self.hparams.num_train, self.hparams.num_val) if self.hparams.num_val else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=max(self.hparams.batch_size, 64))


class VisionPretrainModule(LightningModule):
    """A ``CLIPVisionModel`` (randomly initialised) plus a linear dense head, trained on :class:`DenseTargets`.

    Loss: cross-entropy of colour and shape over all patches, binary cross-entropy of the box-centre flag,
    ``box_weight`` x L1 of the box (image fractions) on the patches that hold a centre, ``center_attribute_weight``
    x cross-entropy of that centre object's colour, shape and size on the same patches, and ``object_box_weight``
    x L1 of the object box on the patches an object covers.

    Args:
        image_size: input side in pixels (must match the data module).
        patch_size: patch side.
        hidden_size: ViT width (heads of 32 channels).
        num_layers: ViT depth (the LLaVA reads the last layer).
        lr: peak AdamW learning rate (linear warmup, cosine decay).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps spent warming up.
        box_weight: weight of the box L1 term.
        object_box_weight: weight of the object-box L1 term (0 turns it off).
        center_attribute_weight: weight of the centre object's colour/shape/size cross-entropies (0 turns them
            off): the patch that holds an object's box also says what the object is, one token per object.
        seed: seeds the initial weights.
    """

    def __init__(self, image_size: int = 96, patch_size: int = 12, hidden_size: int = 128, num_layers: int = 3,
                 lr: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05, box_weight: float = 10.0,
                 object_box_weight: float = 0.0, center_attribute_weight: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        from spr_lightning.tiny._common import seeded
        from spr_lightning.tiny.small_llava import small_vision_config

        self.save_hyperparameters()
        with seeded(seed):
            self.tower = CLIPVisionModel(small_vision_config(image_size, patch_size, hidden_size, num_layers))
            self.head = nn.Linear(hidden_size, HEAD_WIDTH)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` uint8 images -> ``[B, patches, HEAD_WIDTH]`` head outputs."""
        pixels = (images.float() / 255.0 - self.mean) / self.std
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.head(hidden)

    def _losses(self, batch: list[Tensor]) -> dict[str, Tensor]:
        images, color, shape, center, box, object_box, center_attributes = batch
        out = self(images)
        c, s = NUM_COLOR_CLASSES, NUM_SHAPE_CLASSES
        color_logits, shape_logits = out[..., :c], out[..., c : c + s]
        center_logit, box_pred = out[..., c + s], out[..., c + s + 1 : c + s + 5]
        object_box_pred = out[..., c + s + 5 : c + s + 9]
        attribute_logits = out[..., c + s + 9 :].split(_CENTER_CLASSES, dim=-1)
        has = center > 0
        box_l1 = (box_pred[has] - box[has]).abs().mean() if has.any() else box_pred.sum() * 0.0
        attribute_ce = [nn.functional.cross_entropy(logits[has], center_attributes[has][:, k]) if has.any()
                        else logits.sum() * 0.0 for k, logits in enumerate(attribute_logits)]
        objects = color > 0
        object_box_l1 = ((object_box_pred[objects] - object_box[objects]).abs().mean() if objects.any()
                         else object_box_pred.sum() * 0.0)
        losses = {
            "color": nn.functional.cross_entropy(color_logits.flatten(0, 1), color.flatten()),
            "shape": nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape.flatten()),
            "center": nn.functional.binary_cross_entropy_with_logits(center_logit, center),
            "box_l1": box_l1,
        }
        losses["object_box_l1"] = object_box_l1
        losses["center_attributes"] = sum(attribute_ce)
        losses["loss"] = (losses["color"] + losses["shape"] + losses["center"] + self.hparams.box_weight * box_l1
                          + self.hparams.object_box_weight * object_box_l1
                          + self.hparams.center_attribute_weight * losses["center_attributes"])
        for name, logits, k in zip(("color", "shape", "size"), attribute_logits, range(3)):
            hits = (logits.argmax(-1) == center_attributes[..., k])[has]
            losses[f"center_{name}_accuracy"] = hits.float().mean() if has.any() else hits.sum() * 0.0
        losses["color_accuracy"] = (color_logits.argmax(-1) == color)[objects].float().mean()
        losses["shape_accuracy"] = (shape_logits.argmax(-1) == shape)[objects].float().mean()
        losses["box_error_px"] = box_l1.detach() * images.shape[-1]
        losses["object_box_error_px"] = object_box_l1.detach() * images.shape[-1]
        return losses

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        losses = self._losses(batch)
        size = batch[0].shape[0]
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=size)
        for name in ("color_accuracy", "shape_accuracy", "box_error_px", "object_box_error_px",
                     "center_shape_accuracy"):
            self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        losses = self._losses(batch)
        size = batch[0].shape[0]
        for name in ("loss", "color_accuracy", "shape_accuracy", "box_error_px", "object_box_error_px",
                     "center_color_accuracy", "center_shape_accuracy", "center_size_accuracy"):
            self.log(f"val/{name}", losses[name], prog_bar=name in ("shape_accuracy", "box_error_px"),
                     batch_size=size)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_cosine([p for p in self.parameters() if p.requires_grad], lr=hp.lr,
                            weight_decay=hp.weight_decay, warmup_ratio=hp.warmup_ratio,
                            total_steps=self.trainer.estimated_stepping_batches)

    def export_model(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` the tower alone (a plain ``CLIPVisionModel`` folder, heads dropped)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tower.save_pretrained(out)
        return out

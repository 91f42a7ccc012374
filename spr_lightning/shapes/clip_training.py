"""Teach a small open_clip model to read SPR-Shapes regions: the semantic scorer of the quickstart.

SPR's semantic score (``spr_lightning.scoring.semantic.SemanticScorer``) compares a region crop with a description
through CLIP. A random CLIP scores noise, and no pretrained CLIP may be downloaded, so the quickstart trains a
small one contrastively on the world it scores:

* **data** (:class:`ShapesCLIPDataModule`): crops prepared exactly as the scorer prepares them (``crop_image`` of
  the crop box, padded to a square with the preprocessing mean), of single objects (box x1.5, text
  ``"a small red triangle"``) and of SPR regions grown by :class:`~spr_lightning.regions.RegionSampler` (text: the
  region's objects listed as the SFT answers list them, boxes stripped); each text comes with a *hard
  negative*, the same text with one colour, shape or size word changed;
* **loss** (:class:`CLIPContrastiveModule`): the CLIP loss (symmetric cross-entropy over the batch) where each
  image also has to beat the hard negatives of the batch, so the score learns to care about every attribute,
  which is what separates a good candidate description from a bad one;
* **export**: ``export_model(folder)`` writes open_clip's own format (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), which ``SemanticScorer(model_name=<folder>)`` loads as ``local-dir:``;
  ``callbacks.ModelExport`` calls it at the end of fit.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spr_lightning.regions import RegionSampler
from spr_lightning.scoring.grounders import crop_image
from spr_lightning.scoring.semantic import pad_to_square
from spr_lightning.shapes.captions import join_phrases, noun_phrase
from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES

__all__ = ["DEFAULT_CLIP_CONFIG", "CLIPContrastiveModule", "ShapesCLIPDataModule", "hard_negative", "region_text"]

#: A plain ViT with class-token pooling (the scorer's local attention needs it) and open_clip's own BPE
#: vocabulary (its tokenizer ships inside the wheel: nothing is downloaded).
DEFAULT_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2, "mlp_ratio": 2.0},
}
_MEAN, _STD = list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD)
_ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}


# ------------------------------------------------------------------------------------------------ texts
def region_text(labels: Sequence[str], centers: Sequence[tuple[float, float]]) -> str:
    """The objects listed as SPR-Shapes writes them (labels grouped, in reading order), boxes left out:
    ``"A small red triangle, two large blue circles and a small green star."``."""
    order = sorted(range(len(labels)), key=lambda i: (centers[i][1], centers[i][0], i))
    groups: dict[str, int] = {}
    for i in order:
        groups[labels[i]] = groups.get(labels[i], 0) + 1
    text = join_phrases([noun_phrase(label, n) for label, n in groups.items()])
    return text[0].upper() + text[1:] + "."


def hard_negative(labels: Sequence[str], centers: Sequence[tuple[float, float]], rng: np.random.Generator) -> str:
    """:func:`region_text` with one attribute (size, colour or shape) of one listed label changed."""
    target = labels[int(rng.integers(len(labels)))]
    words = dict(zip(("size", "color", "shape"), target.split()))
    attribute = ("size", "color", "shape")[int(rng.integers(3))]
    options = [v for v in _ATTRIBUTES[attribute] if v != words[attribute]]
    words[attribute] = options[int(rng.integers(len(options)))]
    changed = " ".join(words[a] for a in ("size", "color", "shape"))
    return region_text([changed if label == target else label for label in labels], centers)


# ------------------------------------------------------------------------------------------------- data
class _CropDataset(Dataset):
    """``(square crop, text, hard negative)`` triples, listed up front (crop box and texts), cut on read."""

    def __init__(self, items: list[tuple[str, tuple[float, ...], str, str]], image_root: Path, fill: tuple) -> None:
        self.items = items
        self.image_root = image_root
        self.fill = fill

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, str, str]:
        file_name, crop_box, text, negative = self.items[index]
        with Image.open(self.image_root / file_name) as handle:
            image = handle.convert("RGB")
        return pad_to_square(crop_image(image, crop_box)[0], self.fill)[0], text, negative


def _collate(batch: list[tuple[Image.Image, str, str]]) -> dict[str, list]:
    return {"images": [b[0] for b in batch], "texts": [b[1] for b in batch], "negatives": [b[2] for b in batch]}


def _expand(box: Sequence[float], scale: float, size: tuple[int, int]) -> tuple[float, float, float, float]:
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) * scale, (box[3] - box[1]) * scale
    return max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(float(size[0]), cx + w / 2), min(float(size[1]), cy + h / 2)


def crop_items(coco: dict[str, Any], samples_per_image: int, seed: int) -> list[tuple[str, tuple, str, str]]:
    """The crops of a COCO-layout SPR-Shapes file: per image, half single objects and half SPR regions."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    sampler, items = RegionSampler(), []
    for image in coco["images"]:
        anns = per_image.get(image["id"], [])
        if not anns:
            continue
        size = (int(image["width"]), int(image["height"]))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        labels = [names[a["category_id"]] for a in anns]
        centers = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        rng = np.random.default_rng([seed, image["id"]])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + image["id"])
        for k in range(samples_per_image):
            region = sampler.sample(boxes, size, generator) if k % 2 else None
            if region is not None:
                keep = list(region.object_indices)
                crop, sub_labels, sub_centers = region.crop_box, [labels[i] for i in keep], [centers[i] for i in keep]
            else:
                i = int(rng.integers(len(anns)))
                crop, sub_labels, sub_centers = _expand(boxes[i], 1.5, size), [labels[i]], [centers[i]]
            items.append((image["file_name"], tuple(crop), region_text(sub_labels, sub_centers),
                          hard_negative(sub_labels, sub_centers, rng)))
    return items


class ShapesCLIPDataModule(LightningDataModule):
    """Region and object crops of an SPR-Shapes world with their texts, for :class:`CLIPContrastiveModule`.

    Args:
        annotations: the world's COCO detection file of the training split (``annotations/instances_train.json``).
        image_root: the world's ``images`` folder.
        val_annotations: an optional held-out COCO file (``instances_val.json``) for validation accuracies.
        samples_per_image: crops per image and epoch-list (half objects, half regions).
        batch_size: crops per batch; every other crop's text and all hard negatives are its negatives.
        num_workers: dataloader workers.
        seed: fixes which objects and regions are cropped.
    """

    def __init__(self, annotations: str, image_root: str, val_annotations: str | None = None,
                 samples_per_image: int = 8, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fill = tuple(int(round(255 * m)) for m in _MEAN)
        self.datasets: dict[str, _CropDataset] = {}

    def setup(self, stage: str) -> None:
        hp = self.hparams
        for split, path in (("train", hp.annotations), ("val", hp.val_annotations)):
            if path is not None and split not in self.datasets:
                coco = json.loads(Path(path).read_text(encoding="utf-8"))
                items = crop_items(coco, hp.samples_per_image, hp.seed + (split == "val"))
                self.datasets[split] = _CropDataset(items, Path(hp.image_root), self.fill)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, collate_fn=_collate)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []
        return DataLoader(self.datasets["val"], batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers, collate_fn=_collate)


# ------------------------------------------------------------------------------------------------ model
class CLIPContrastiveModule(LightningModule):
    """Trains an open_clip ``CLIP`` from scratch with the CLIP loss plus hard negative texts.

    With image embeddings ``u_i``, text embeddings ``v_j`` and hard negatives ``w_j`` (all normalised) and the
    learned scale ``s``:

    .. math::

        L = \\tfrac12 \\Big[\\mathrm{CE}_i\\big(s\\,u_i^\\top [v_1..v_B, w_1..w_B], i\\big)
            + \\mathrm{CE}_j\\big(s\\,v_j^\\top [u_1..u_B], j\\big)\\Big]

    Args:
        model_config: open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``); default
            :data:`DEFAULT_CLIP_CONFIG`. The vision tower must be a ViT with ``tok`` pooling (local attention).
        lr: AdamW peak learning rate (linear warmup, cosine decay to 10%).
        weight_decay: AdamW weight decay (not on gains, biases, embeddings and the scale).
        warmup_steps: linear warmup steps.
        seed: seeds the initial weights.
    """

    def __init__(self, model_config: dict[str, Any] | None = None, lr: float = 2e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = copy.deepcopy(model_config or DEFAULT_CLIP_CONFIG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = open_clip.CLIP(**self.model_config)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, tuple) else int(size)
        self.transform = open_clip.image_transform(self.image_size, is_train=False, mean=_MEAN, std=_STD,
                                                   resize_mode="squash", interpolation="bicubic")
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.model_config["text_cfg"]["context_length"])

    def _embed(self, batch: dict[str, list]) -> tuple[Tensor, Tensor, Tensor]:
        pixels = torch.stack([self.transform(image) for image in batch["images"]]).to(self.device)
        tokens = self.tokenizer(batch["texts"] + batch["negatives"]).to(self.device)
        images = nn.functional.normalize(self.model.encode_image(pixels), dim=-1)
        texts = nn.functional.normalize(self.model.encode_text(tokens), dim=-1)
        size = len(batch["texts"])
        return images, texts[:size], texts[size:]

    def contrastive_step(self, batch: dict[str, list]) -> dict[str, Tensor]:
        """Loss (see the class docstring), in-batch retrieval accuracy and hard-negative accuracy."""
        images, texts, negatives = self._embed(batch)
        scale = self.model.logit_scale.exp().clamp(max=100.0)
        target = torch.arange(len(texts), device=self.device)
        image_logits = scale * images @ torch.cat([texts, negatives]).T
        text_logits = scale * texts @ images.T
        loss = (nn.functional.cross_entropy(image_logits, target) + nn.functional.cross_entropy(text_logits, target))
        positive, negative = (images * texts).sum(-1), (images * negatives).sum(-1)
        return {"loss": loss / 2, "retrieval_accuracy": (image_logits[:, : len(texts)].argmax(-1) == target).float()
                .mean(), "hard_negative_accuracy": (positive > negative).float().mean()}

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor:
        stats = self.contrastive_step(batch)
        size = len(batch["texts"])
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=size)
        self.log("train/hard_negative_accuracy", stats["hard_negative_accuracy"], prog_bar=True, batch_size=size)
        return stats["loss"]

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        stats = self.contrastive_step(batch)
        size = len(batch["texts"])
        for name, value in stats.items():
            self.log(f"val/{name}", value, prog_bar=name != "loss", batch_size=size)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_model(self, out_dir: str | Path) -> Path:
        """Save in open_clip's format: ``open_clip_model.safetensors`` + ``open_clip_config.json`` (``local-dir:``)."""
        from spr_lightning.tiny.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / OPEN_CLIP_WEIGHTS))
        preprocess = {"size": self.image_size, "mean": _MEAN, "std": _STD, "interpolation": "bicubic",
                      "resize_mode": "squash"}
        config = {"model_cfg": self.model_config, "preprocess_cfg": preprocess}
        (path / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

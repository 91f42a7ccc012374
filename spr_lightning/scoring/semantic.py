"""Semantic score of SPR §3.2 (Eq. 1-2 and appendix §1) with an open_clip model.

.. math::

    S(I, T) = \\alpha \\cos(F_{region}(I), F_{text}(T)), \\qquad
    S_{sem} = \\tfrac12 \\big(S(I_{crop}, T) + S_{local}(I, T)\\big), \\qquad \\alpha = 5

* ``crop``: the region expanded 1.5× (the caller's ``crop_box``) is cropped and **padded to a square** ("pad it
  into a square before feeding it into the CLIP model"), then resized to the tower's input; nothing is cut by a
  centre crop.
* ``local``: the whole image is padded to a square ("preprocess the image into a square shape and ensure that
  the queried region is fully contained within the square"), resized, and encoded with local attention on the
  region (:mod:`spr_lightning.scoring.local_attention`).

Padding uses the preprocessing mean colour, which normalises to zero, as LLaVA's ``expand2square`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import nn

from spr_lightning.scoring.grounders import crop_image
from spr_lightning.scoring.local_attention import (
    check_local_attention_support,
    encode_image_local,
    normalized,
    region_patch_mask,
)

LOCAL_DIR = "local-dir:"


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Centre ``image`` on a square canvas of its long side.

    Returns:
        ``(square, (left, top))``: the canvas and where the image's top-left corner landed on it.
    """
    image = image.convert("RGB")
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image, (0, 0)
    offset = ((side - width) // 2, (side - height) // 2)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, offset)
    return canvas, offset


def _resolve_model_name(model_name: str) -> str:
    """``tiny:<name>`` and existing folders become open_clip ``local-dir:`` names; anything else is unchanged."""
    if model_name.startswith("tiny:"):
        from spr_lightning.tiny import resolve_model_path

        return LOCAL_DIR + resolve_model_path(model_name)
    if Path(model_name).is_dir():
        return LOCAL_DIR + model_name
    return model_name


class SemanticScorer(nn.Module):
    """Scores candidate descriptions of image regions with CLIP (SPR Eq. 1-2).

    An ``nn.Module`` so that Lightning moves it with the module holding it: inputs go to the device of the CLIP
    weights and scores come back there.

    Args:
        model_name: open_clip architecture (``"ViT-L-14-336"`` in the paper), ``"local-dir:<folder>"`` or a folder
            holding ``open_clip_config.json`` + weights, ``"hf-hub:<repo>"``, or ``"tiny:open_clip"``.
        pretrained: open_clip tag (``"openai"``) or a local weights file; unused with folder and hub names.
        alpha: similarity scale α of Eq. 1 (5 in SPR).
        precision: open_clip precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
        image_batch_size: images per forward pass of the vision tower.
        text_batch_size: texts per forward pass of the text tower.
        cache_dir: open_clip download/cache folder.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        alpha: float = 5.0,
        precision: str = "fp32",
        image_batch_size: int = 32,
        text_batch_size: int = 256,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        name = _resolve_model_name(model_name)
        # open_clip ignores `pretrained` for schema names ("local-dir:", "hf-hub:") and warns; say it once here.
        pretrained = None if name.startswith((LOCAL_DIR, "hf-hub:")) else pretrained
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, cache_dir=cache_dir
        )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
        check_local_attention_support(self.model.visual)
        cfg = self.model.visual.preprocess_cfg
        # The inputs are squares already, so "squash" only resizes: no centre crop can cut the region.
        self.transform = open_clip.image_transform(
            self.model.visual.image_size, is_train=False, mean=cfg["mean"], std=cfg["std"],
            resize_mode="squash", interpolation=cfg["interpolation"],
        )
        self.fill = tuple(int(round(255 * m)) for m in cfg["mean"])
        self.alpha = float(alpha)
        self.image_batch_size = image_batch_size
        self.text_batch_size = text_batch_size

    @property
    def device(self) -> torch.device:
        """Where the CLIP weights are, hence where inputs go and scores come back."""
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def _pixels(self, squares: Sequence[Image.Image]) -> torch.Tensor:
        dtype = self.model.visual.conv1.weight.dtype
        return torch.stack([self.transform(s) for s in squares]).to(self.device, dtype=dtype)

    @torch.no_grad()
    def encode_crops(self, images: Sequence[Image.Image], crop_boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """Normalised embeddings ``[Q, D]`` of each crop, padded to a square."""
        squares = [pad_to_square(crop_image(im, box)[0], self.fill)[0] for im, box in zip(images, crop_boxes)]
        feats = [self.model.encode_image(self._pixels(squares[i : i + self.image_batch_size]))
                 for i in range(0, len(squares), self.image_batch_size)]
        return normalized(torch.cat(feats)) if feats else torch.empty(0, self.embed_dim, device=self.device)

    def local_inputs(self, image: Image.Image, region: Sequence[float]) -> tuple[Image.Image, torch.Tensor]:
        """The padded square image and the patch mask of ``region`` (``xyxy`` image pixels) on the tower's grid."""
        square, (left, top) = pad_to_square(image, self.fill)
        side = square.size[0]
        x1, y1, x2, y2 = (float(v) for v in region)
        box = ((x1 + left) / side, (y1 + top) / side, (x2 + left) / side, (y2 + top) / side)
        return square, region_patch_mask(box, tuple(self.model.visual.grid_size))

    @torch.no_grad()
    def encode_local(self, images: Sequence[Image.Image], regions: Sequence[Sequence[float]]) -> torch.Tensor:
        """Normalised full-image embeddings ``[Q, D]`` pooled with local attention on each region."""
        feats = []
        for i in range(0, len(images), self.image_batch_size):
            inputs = [self.local_inputs(im, r) for im, r in zip(images[i : i + self.image_batch_size],
                                                                 regions[i : i + self.image_batch_size])]
            keep = torch.stack([mask for _, mask in inputs])
            feats.append(encode_image_local(self.model.visual, self._pixels([sq for sq, _ in inputs]), keep))
        return normalized(torch.cat(feats)) if feats else torch.empty(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[N, D]``; the tokenizer truncates each text to the model's context."""
        feats = []
        for i in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.text_batch_size])).to(self.device)
            feats.append(self.model.encode_text(tokens))
        return normalized(torch.cat(feats)) if feats else torch.empty(0, self.embed_dim, device=self.device)

    def score(
        self,
        images: Sequence[Image.Image],
        regions: Sequence[Sequence[float]],
        crop_boxes: Sequence[Sequence[float]],
        texts: Sequence[Sequence[str]],
    ) -> list[dict[str, torch.Tensor]]:
        """Semantic scores of every query's candidates.

        Each query costs one crop encode and one local-attention encode of its full image; all candidate texts
        of all queries are encoded in one text batch (split by ``text_batch_size``).

        Args:
            images: one PIL image per query.
            regions: the queried region per query, ``xyxy`` image pixels.
            crop_boxes: the expanded crop per query (region × 1.5 in SPR), ``xyxy`` image pixels.
            texts: per query, its candidate descriptions with the grounding text already stripped.

        Returns:
            per query ``{"sem", "crop", "local"}``, each a float32 tensor ``[K_i]`` on the model's device;
            ``sem = (crop + local) / 2`` and ``crop``/``local`` are ``alpha * cos``.
        """
        if not len(images) == len(regions) == len(crop_boxes) == len(texts):
            raise ValueError("images, regions, crop_boxes and texts need one entry per query")
        crop_feats = self.encode_crops(images, crop_boxes)
        local_feats = self.encode_local(images, regions)
        text_feats = self.encode_texts([t for candidates in texts for t in candidates])
        out, start = [], 0
        for q, candidates in enumerate(texts):
            feats = text_feats[start : start + len(candidates)]
            start += len(candidates)
            crop = self.alpha * feats @ crop_feats[q]
            local = self.alpha * feats @ local_feats[q]
            out.append({"sem": (crop + local) / 2, "crop": crop, "local": local})
        return out

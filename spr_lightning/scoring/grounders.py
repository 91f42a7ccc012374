"""Open-vocabulary grounders for the localization score (SPR §3.2, Algorithm 1 step 2).

SPR runs GroundingDINO on the **cropped region** with the plain description as caption. Two backends share the
:class:`Grounder` protocol, both loaded the way their users load them:

* :class:`HFGroundingDino`: transformers' ``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor`` (hub id,
  local folder, or ``"tiny:grounding_dino"``), batched.
* :class:`GroundingDinoPy`: the original ``groundingdino-py`` package (``SLConfig`` file + official ``.pth``
  checkpoint, ``groundingdino.util.inference.predict``), with :mod:`~spr_lightning.scoring.gdino_compat` applied so
  it builds under transformers 5.

Boxes always come back as ``xyxy`` pixels of the image that was passed in; :func:`ground_in_region` crops,
grounds and maps the boxes back to the full image with :func:`spr_lightning.regions.crop_to_image`.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from spr_lightning.regions import crop_to_image

DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25


@dataclass
class GroundingResult:
    """Detections on one image: ``boxes [N, 4]`` float32 ``xyxy`` pixels, ``scores [N]``, one phrase per box."""

    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    phrases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.boxes.shape != (len(self.phrases), 4) or self.scores.shape != (len(self.phrases),):
            raise ValueError(
                f"inconsistent result: boxes {tuple(self.boxes.shape)}, scores {tuple(self.scores.shape)}, "
                f"{len(self.phrases)} phrases"
            )

    def __len__(self) -> int:
        return len(self.phrases)


@runtime_checkable
class Grounder(Protocol):
    """Anything that finds the phrases of a caption in an image."""

    def ground(
        self,
        image: Image.Image,
        caption: str | Sequence[str],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> GroundingResult:
        """Boxes (``xyxy`` pixels of ``image``) whose best token score exceeds ``box_threshold``; each box's
        phrase is made of the caption tokens scoring above ``text_threshold``."""
        ...


def format_caption(caption: str | Sequence[str]) -> str:
    """GroundingDINO's caption convention: lower case, phrases separated by ``". "``, ending with ``"."``.

    A list of phrases is joined as transformers' processor joins candidate labels (``["A cat", "a dog"]`` →
    ``"a cat. a dog."``); a string gets what ``groundingdino.util.inference.preprocess_caption`` does.
    """
    text = ". ".join(p.strip().lower() for p in caption) if not isinstance(caption, str) else caption.lower().strip()
    return text if text.endswith(".") else text + "."


def pixel_crop_box(box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Whole-pixel crop holding ``box`` (floor the top-left, ceil the bottom-right), clipped to the image.

    Mapping results back must use this box, not the float one, or every box shifts by the rounding.
    """
    width, height = image_size
    x1, y1 = max(0, math.floor(float(box[0]))), max(0, math.floor(float(box[1])))
    x2, y2 = min(width, math.ceil(float(box[2]))), min(height, math.ceil(float(box[3])))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop box {list(box)} has no area inside the {width}x{height} image")
    return x1, y1, x2, y2


def crop_image(image: Image.Image, box: Sequence[float]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``(crop, pixel_box)``: ``image`` cropped to :func:`pixel_crop_box` of ``box``, as RGB."""
    pixel_box = pixel_crop_box(box, image.size)
    return image.convert("RGB").crop(pixel_box), pixel_box


def ground_in_region(
    grounder: Grounder,
    image: Image.Image,
    crop_box: Sequence[float],
    caption: str | Sequence[str],
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    text_threshold: float = DEFAULT_TEXT_THRESHOLD,
) -> GroundingResult:
    """Ground ``caption`` on the crop ``crop_box`` of ``image``; boxes come back in ``image`` pixels."""
    crop, pixel_box = crop_image(image, crop_box)
    result = grounder.ground(crop, caption, box_threshold=box_threshold, text_threshold=text_threshold)
    boxes = crop_to_image(result.boxes, pixel_box).to(torch.float32)
    return GroundingResult(boxes=boxes, scores=result.scores, phrases=result.phrases)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class HFGroundingDino(nn.Module):
    """GroundingDINO through transformers (``IDEA-Research/grounding-dino-tiny`` / ``-base``, or a local folder).

    Args:
        model_name_or_path: hub id, local folder, or ``"tiny:grounding_dino"``.
        device: where to put the model; ``None`` leaves it where ``.to()`` (e.g. Lightning) puts it.
    """

    def __init__(self, model_name_or_path: str, device: str | None = None):
        super().__init__()
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from spr_lightning.tiny import resolve_model_path

        path = resolve_model_path(model_name_or_path)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    def ground(
        self,
        image: Image.Image,
        caption: str | Sequence[str],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> GroundingResult:
        return self.ground_batch([image], [caption], box_threshold, text_threshold)[0]

    @torch.no_grad()
    def ground_batch(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str | Sequence[str]],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> list[GroundingResult]:
        """One forward pass for all images (padded by the processor), each with its own caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if not images:
            return []
        images = [im.convert("RGB") for im in images]
        # Formatted captions all contain ".", so the processor reads the list as one caption per image.
        texts = [format_caption(c) for c in captions]
        # GroundingDINO's text branch holds at most `max_text_len` tokens (256); longer descriptions are cut,
        # as the original implementation does, instead of failing inside the model.
        max_len = getattr(self.model.config, "max_text_len", 256)
        inputs = self.processor(images=images, text=texts, padding="longest", truncation=True, max_length=max_len,
                                return_tensors="pt")
        device = _module_device(self.model)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        detections = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[(im.height, im.width) for im in images],
        )
        return [
            GroundingResult(
                boxes=d["boxes"].float().cpu(), scores=d["scores"].float().cpu(), phrases=list(d["text_labels"])
            )
            for d in detections
        ]


class GroundingDinoPy(nn.Module):
    """GroundingDINO through the original ``groundingdino-py`` package and its official config/checkpoint files.

    Args:
        config_file: the package's python config (``GroundingDINO_SwinT_OGC.py`` / ``GroundingDINO_SwinB_cfg.py``).
        checkpoint: ``groundingdino_swint_ogc.pth``-style file holding ``{"model": state_dict}``.
        text_encoder: local BERT folder (``BertModel`` + tokenizer) replacing the config's ``text_encoder_type``
            (``"bert-base-uncased"``, fetched from the hub otherwise).
        device: where the model runs.
        image_size: short side the image is resized to (800, as in ``groundingdino.util.inference.load_image``).
        max_size: cap on the long side (1333, idem).
    """

    def __init__(
        self,
        config_file: str,
        checkpoint: str,
        text_encoder: str | None = None,
        device: str = "cpu",
        image_size: int = 800,
        max_size: int = 1333,
    ) -> None:
        super().__init__()
        import groundingdino.datasets.transforms as T
        from groundingdino.models import build_model
        from groundingdino.util.misc import clean_state_dict
        from groundingdino.util.slconfig import SLConfig

        from spr_lightning.scoring import gdino_compat

        gdino_compat.apply()
        # groundingdino.util.inference.load_model, with the text encoder override in between.
        args = SLConfig.fromfile(config_file)
        args.device = device
        if text_encoder is not None:
            args.text_encoder_type = str(text_encoder)
        self.model = build_model(args)
        # Tensors only: a checkpoint that needs arbitrary unpickling (code execution) is refused.
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{checkpoint}: refusing to unpickle non-tensor objects (weights_only=True). Re-save it as "
                "{'model': state_dict} with torch.save, or convert it to safetensors"
            ) from error
        self.load_report = self.model.load_state_dict(clean_state_dict(state["model"]), strict=False)
        self.model.eval().requires_grad_(False).to(device)
        self.transform = T.Compose(
            [T.RandomResize([image_size], max_size=max_size), T.ToTensor(),
             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        )

    def ground(
        self,
        image: Image.Image,
        caption: str | Sequence[str],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> GroundingResult:
        from groundingdino.util.inference import predict
        from torchvision.ops import box_convert

        image = image.convert("RGB")
        pixels, _ = self.transform(image, None)
        device = _module_device(self.model)
        boxes, scores, phrases = predict(
            self.model, pixels, format_caption(caption), box_threshold, text_threshold, device=str(device)
        )
        scale = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32)
        xyxy = box_convert(boxes.float() * scale, in_fmt="cxcywh", out_fmt="xyxy")
        return GroundingResult(boxes=xyxy, scores=scores.float(), phrases=list(phrases))

    def ground_batch(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str | Sequence[str]],
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> list[GroundingResult]:
        """One ``predict`` call per image: the package's inference API takes a single image and caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return [self.ground(im, c, box_threshold, text_threshold) for im, c in zip(images, captions)]

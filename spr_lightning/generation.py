"""Stage 1 of SPR (§3.1 "Grounded Region Description Generation"): K grounded descriptions per region.

``CandidateGenerator.predict_step`` takes regions from ``datamodules.regions.RegionQueryDataModule``, prompts
the policy with every template (the crop for crop templates, the full image otherwise), samples
``num_candidates`` answers per prompt in one batched ``generate`` call, maps the boxes of crop answers back to
the full image (SPR appendix) and returns one WebDataset sample per region for ``callbacks.ShardWriter``.

DPO later trains on ``(full image, canonical prompt, chosen, rejected)``, so every candidate is stored as an
answer to the *canonical* prompt on the full image: crop answers are rewritten with full-image boxes in the
model's own codec, and the prompt is rendered through the processor's chat template exactly as
``datamodules.collate`` renders it for DPO.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from datamodules.collate import encode_prompts, pad_sequences, user_message
from datamodules.regions import RegionItem, RegionSpec
from spr_lightning.coords import Codec, get_codec
from spr_lightning.coords.qwen import Qwen2_5VLCodec
from spr_lightning.models import load_policy, load_processor
from spr_lightning.regions import DEFAULT_TEMPLATES, crop_to_image
from spr_lightning.shards import SCHEMA_VERSION

log = logging.getLogger(__name__)

#: The prompt DPO trains on: the region box on the full image, in the model's codec. The default is the
#: ``region`` template, so that candidates of that template answer exactly this prompt.
DEFAULT_CANONICAL_PROMPT = DEFAULT_TEMPLATES["region"].text


def candidate_to_image(
    text: str,
    codec: Codec,
    frame_box: Sequence[float],
    frame_size: tuple[int, int],
    image_size: tuple[int, int],
) -> tuple[str, list[list[float]]]:
    """Rewrite an answer given on a frame (crop or full image) so that its boxes are full-image boxes.

    Boxes are decoded in the frame the model saw (``frame_size``: the crop's size for crop templates), moved
    into image pixels with ``crop_to_image(boxes, frame_box)`` and written back with the same codec on the full
    image. An answer on the full image is kept verbatim (its boxes already are image boxes).

    Returns:
        ``(text, boxes)``: the rewritten text and its boxes decoded on the full image (``xyxy`` image pixels,
        as every later stage will read them, i.e. after the codec's quantisation).
    """
    full_frame = tuple(float(v) for v in frame_box) == (0.0, 0.0, float(image_size[0]), float(image_size[1]))
    if not full_frame:
        local = [g.xyxy for g in codec.decode(text, frame_size)]
        if local:
            text = codec.replace(text, crop_to_image([list(b) for b in local], frame_box), image_size)
    return text, [list(g.xyxy) for g in codec.decode(text, image_size)]


def check_model_sizes(codec: Codec, frame_sizes: Sequence[tuple[int, int]], grid_thw: torch.Tensor,
                      patch_size: int) -> None:
    """Qwen2.5-VL writes pixels of its *resized* input: the codec's idea of that size must match the processor's.

    Raises:
        ValueError: naming both sizes and the codec options to change.
    """
    for (width, height), (_, grid_h, grid_w) in zip(frame_sizes, grid_thw.tolist()):
        seen = (int(grid_w) * patch_size, int(grid_h) * patch_size)
        expected = tuple(codec.model_size((width, height)))  # type: ignore[attr-defined]
        if seen != expected:
            raise ValueError(
                f"the processor resized a {width}x{height} image to {seen[0]}x{seen[1]} but the "
                f"{codec.name} codec assumes {expected[0]}x{expected[1]} ({codec!r}); set coord_options "
                "(resized_size: smart, min_pixels, max_pixels) to the processor's values in model and data"
            )


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """A sampling seed fixed by the run seed and the batch's region ids (not by rank, order or resume)."""
    digest = hashlib.blake2b(f"{seed}/{'|'.join(keys)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def build_record(spec: RegionSpec, prompt: str, candidates: list[tuple[str, str, str, list[list[float]]]],
                 model: str, template_prompts: dict[str, str]) -> dict[str, Any]:
    """The ``json`` of one region's candidates sample (schema 1; see ``docs/generation.md``).

    ``candidates`` holds ``(template, raw text, full-image text, full-image boxes)`` per candidate.
    """
    return {
        "schema": SCHEMA_VERSION,
        "query_id": spec.region_id,
        "image_id": spec.image_id,
        "file_name": spec.file_name,
        "image_size": list(spec.image_size),
        "region": list(spec.region.box),
        "crop_box": list(spec.region.crop_box),
        "objects": [o.to_dict() for o in spec.objects],
        "prompt": prompt,
        "candidates": [c[2] for c in candidates],
        "candidate_boxes": [c[3] for c in candidates],
        "raw_candidates": [c[1] for c in candidates],
        "templates": [c[0] for c in candidates],
        "template_prompts": template_prompts,
        "coord_format": spec.coord_format,
        "model": model,
    }


def show_progress(bar: Any, text: str) -> None:
    """Show ``text`` beside the predict progress bar (Lightning's predict bars display no metrics of their own)."""
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        bar.predict_progress_bar.set_postfix_str(text)
    elif isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None:
        if bar.predict_progress_bar_id is not None:
            bar.progress.update(bar.predict_progress_bar_id, description=f"Predicting ({text})")


class CandidateGenerator(LightningModule):
    """Sample grounded region descriptions with a VLM and package them as candidate shard samples.

    Args:
        model_name_or_path: hub id, local folder or ``tiny:<family>`` (``AutoModelForImageTextToText``).
        coord_format: the model's box format (``spr_lightning.coords``); must equal the data module's.
        templates: template names to prompt with (``None``: every template the data module rendered).
        num_candidates: answers sampled per prompt (per template), so a region gets
            ``num_candidates * len(templates)`` candidates.
        do_sample: sample (SPR diversifies candidates); ``False`` is greedy and needs ``num_candidates=1``.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        max_new_tokens: generation length limit.
        canonical_prompt: the prompt DPO trains on, with a ``{region}`` placeholder for the region box written
            with the codec on the full image.
        dtype: model weights dtype (``bfloat16`` on GPU; ``float32`` on CPU).
        trust_remote_code: allow model repositories' own code (off unless a config turns it on).
        seed: sampling seed; each batch is seeded from it and the batch's region ids.
        coord_options: codec options, e.g. ``qwen2_5_vl``'s ``resized_size``/``min_pixels``/``max_pixels``
            (checked against what the processor really does); must equal the data module's.
        attn_implementation: optional ``attn_implementation`` for ``from_pretrained`` (e.g. ``sdpa``).
        adapter_path: a trained LoRA adapter (e.g. the DPO stage's export) applied on top, unmerged: sample from
            the aligned policy without merging it first (how the experiments describe held-out regions after DPO).
    """

    def __init__(
        self,
        model_name_or_path: str,
        coord_format: str,
        templates: list[str] | None = None,
        num_candidates: int = 2,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
        canonical_prompt: str = DEFAULT_CANONICAL_PROMPT,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        seed: int = 0,
        coord_options: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        adapter_path: str | None = None,
    ) -> None:
        super().__init__()
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if not do_sample and num_candidates > 1:
            raise ValueError("greedy decoding (do_sample=False) gives one answer per prompt: set num_candidates=1")
        if "{region}" not in canonical_prompt:
            raise ValueError(f"canonical_prompt needs a '{{region}}' placeholder, got {canonical_prompt!r}")
        unknown = [t for t in templates or [] if t not in DEFAULT_TEMPLATES]
        if unknown:
            raise ValueError(f"unknown templates {unknown}; available: {sorted(DEFAULT_TEMPLATES)}")
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.coord_format = coord_format
        self.coord_options = dict(coord_options or {})
        self.codec = get_codec(coord_format, **self.coord_options)
        self.templates = templates
        self.num_candidates = num_candidates
        self.canonical_prompt = canonical_prompt
        self.seed = seed
        self.generation_kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            self.generation_kwargs.update(temperature=temperature, top_p=top_p)
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.stats = {"regions": 0, "queries": 0, "candidates": 0, "failed": 0}
        self._start = 0.0

    def configure_model(self) -> None:
        """Load processor and policy once, inside the strategy's context (before it moves them to the device)."""
        if self.model is not None:
            return
        hp = self.hparams
        self.processor = load_processor(self.model_name_or_path, trust_remote_code=hp.trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same end
        self.model = load_policy(self.model_name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code,
                                 attn_implementation=hp.attn_implementation)
        if hp.adapter_path is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, hp.adapter_path, is_trainable=False)
        self.model.eval()

    # ----------------------------------------------------------------------------------- generation
    def render_chat(self, prompt: str) -> str:
        """The prompt as the model reads it: the chat template with the generation prompt (as DPO renders it)."""
        return self.processor.apply_chat_template(user_message(prompt), add_generation_prompt=True, tokenize=False)

    def model_inputs(self, prompts: list[str], images: list[Any]) -> dict[str, Any]:
        """Left-padded generation inputs, tokenised by ``datamodules.collate.encode_prompts`` (DPO's tokeniser)."""
        ids, per_token, image_inputs = encode_prompts(self.processor, [self.render_chat(p) for p in prompts], images)
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs: dict[str, Any] = {
            "input_ids": pad_sequences(ids, pad_id, "left"),
            "attention_mask": pad_sequences([torch.ones_like(i) for i in ids], 0, "left"),
            **{key: pad_sequences(seqs, 0, "left") for key, seqs in per_token.items()},
        }
        dtype = next(self.model.parameters()).dtype
        for key, value in image_inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.to(dtype)
            inputs[key] = value
        inputs["pad_token_id"] = pad_id
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def generate(self, prompts: list[str], images: list[Any], frame_sizes: list[tuple[int, int]]) -> list[list[str]]:
        """``num_candidates`` decoded answers (new tokens only, special tokens dropped) per prompt, one call."""
        inputs = self.model_inputs(prompts, images)
        if isinstance(self.codec, Qwen2_5VLCodec) and "image_grid_thw" in inputs:
            check_model_sizes(self.codec, frame_sizes, inputs["image_grid_thw"].cpu(),
                              int(self.processor.image_processor.patch_size))
        out = self.model.generate(**inputs, num_return_sequences=self.num_candidates, **self.generation_kwargs)
        texts = self.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        k = self.num_candidates
        return [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(len(prompts))]

    # ------------------------------------------------------------------------------------ lightning
    def _selected(self, item: RegionItem) -> list[Any]:
        prompts = {p.template_name: p for p in item.spec.prompts}
        if self.templates is None:
            return list(item.spec.prompts)
        missing = [t for t in self.templates if t not in prompts]
        if missing:
            raise ValueError(f"region {item.spec.region_id}: the data module rendered no prompt for templates "
                             f"{missing}; add them to data.templates")
        return [prompts[t] for t in self.templates]

    def predict_step(self, batch: list[RegionItem], batch_idx: int = 0) -> list[dict[str, Any]]:
        """Generate for every region of ``batch``; return one candidates sample per region."""
        items = []
        for item in batch:
            if item.error is not None:
                self.stats["failed"] += 1
                log.warning("skipping region %s: %s", item.spec.region_id, item.error)
                continue
            if item.spec.coord_format != self.coord_format:
                raise ValueError(f"data coord_format {item.spec.coord_format!r} != model coord_format "
                                 f"{self.coord_format!r}: prompts and answers would use different box formats")
            items.append(item)
        if not items:
            return []
        requests = [(item, p) for item in items for p in self._selected(item)]
        frames = [(round(p.frame_box[2] - p.frame_box[0]), round(p.frame_box[3] - p.frame_box[1])) for _, p in requests]
        torch.manual_seed(batch_seed(self.seed, [item.spec.region_id for item in items]))
        images = [item.crop if p.uses_crop else item.image for item, p in requests]
        answers = self.generate([p.text for _, p in requests], images, frames)
        per_region: dict[str, list[tuple[str, str, str, list[list[float]]]]] = {i.spec.region_id: [] for i in items}
        for (item, prompt), frame, texts in zip(requests, frames, answers):
            for raw in texts:
                text, boxes = candidate_to_image(raw, self.codec, prompt.frame_box, frame, item.spec.image_size)
                per_region[item.spec.region_id].append((prompt.template_name, raw, text, boxes))
        samples = [self._sample(item, per_region[item.spec.region_id]) for item in items]
        self.stats["regions"] += len(items)
        self.stats["queries"] += len(requests)
        self.stats["candidates"] += sum(len(c) for c in per_region.values())
        return samples

    def _sample(self, item: RegionItem, candidates: list[tuple[str, str, str, list[list[float]]]]) -> dict[str, Any]:
        spec = item.spec
        region_text = self.codec.encode(spec.region.box, spec.image_size)
        prompt = self.canonical_prompt.format(region=region_text)
        template_prompts = {p.template_name: p.text for p in self._selected(item)}
        model = self.model_name_or_path if self.hparams.adapter_path is None else (
            f"{self.model_name_or_path} + {self.hparams.adapter_path}")
        record = build_record(spec, prompt, candidates, model, template_prompts)
        # The file's own JPEG bytes when they decode to the pixels generated from; else the image, encoded once.
        image = item.image_bytes if item.image_bytes is not None else item.image
        return {"__key__": spec.region_id, "json": record, "jpg": image}

    def on_predict_start(self) -> None:
        self._start = time.perf_counter()
        self.stats = dict.fromkeys(self.stats, 0)

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        s = self.stats
        show_progress(self.trainer.progress_bar_callback if self._trainer is not None else None,
                      f"{s['queries'] / elapsed:.2f} queries/s, {s['candidates']} candidates, {s['failed']} failed")

    def on_predict_end(self) -> None:
        elapsed = time.perf_counter() - self._start
        s = self.stats
        log.info("rank %d: %d regions, %d queries, %d candidates in %.1f s (%.2f queries/s); %d regions skipped "
                 "(unreadable images)", self.global_rank, s["regions"], s["queries"], s["candidates"], elapsed,
                 s["queries"] / max(elapsed, 1e-9), s["failed"])
        if s["failed"]:
            log.warning("rank %d: %d regions had unreadable images and were skipped", self.global_rank, s["failed"])

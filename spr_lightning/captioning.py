"""``RegionCaptionEvaluator``: region captioning (SPR Tab. 4) with ``python -m spr_lightning validate``.

The model is asked about one region at a time, the region written in its own coordinate format
(``Describe the region [100, 250, 500, 750] in the image.`` for Ferret's 0-999 bins), answers greedily, and the
answer, with any boxes it wrote stripped (the codec's ``strip``), is scored against the region's reference
captions with the COCO caption toolkit (:class:`spr_lightning.metrics.CaptionScores`: METEOR and ROUGE_L as in
the paper). Data: :class:`datamodules.captioning.RegionCaptionDataModule` (RefCOCOg, Visual Genome).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from spr_lightning.coords import get_codec
from spr_lightning.generate_utils import GenerativeEvaluator, image_codecs
from spr_lightning.metrics import CaptionScores

__all__ = ["DEFAULT_REGION_PROMPT", "RegionCaptionEvaluator", "render_region_prompt"]

#: SPR §4.4: "We prompt MLLMs with the question 'Describe the region [region] in the image.'"
DEFAULT_REGION_PROMPT = "Describe the region {region} in the image."


def render_region_prompt(template: str, region_text: str) -> str:
    """The question about one region; ``{region}`` is the only field and must be present.

    Raises:
        ValueError: for a template without ``{region}`` or with any other field.
    """
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields != {"region"}:
        raise ValueError(f"prompt_template must use exactly the field {{region}}, got fields {sorted(fields)} "
                         f"in {template!r}")
    return template.format(region=region_text)


class RegionCaptionEvaluator(GenerativeEvaluator):
    """Scores a policy's region captions (METEOR, ROUGE_L); use with ``validate`` or ``test``.

    Args:
        model_name_or_path: policy VLM (hub id, local path or ``tiny:<family>``).
        adapter_path: a trained LoRA adapter (e.g. the DPO stage's export) applied on top, unmerged.
        coord_format: the codec the model reads and writes boxes in (``ferret``, ``qwen2_5_vl``, ...).
        prompt_template: the question; ``{region}`` is replaced by the region in ``coord_format``.
        max_new_tokens: generation length limit.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        trust_remote_code: allow custom model code from the hub.
        predictions_file: JSONL of per-sample predictions; ``{rank}`` is replaced by the global rank. Default:
            ``<trainer.log_dir>/predictions-rank<r>.jsonl``.
        codec_options: constructor options of the codec. For ``qwen2_5_vl`` without ``resized_size`` the region
            is written in the pixels of the image as the processor resizes it (exact per image).
        metrics: caption scores to report (:data:`spr_lightning.metrics.captions.CAPTION_METRICS`).
    """

    task_name = "region caption"

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: str | None = None,
        coord_format: str = "ferret",
        prompt_template: str = DEFAULT_REGION_PROMPT,
        max_new_tokens: int = 64,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        predictions_file: str | None = None,
        codec_options: dict[str, Any] | None = None,
        metrics: Sequence[str] = ("METEOR", "ROUGE_L"),
    ) -> None:
        super().__init__(model_name_or_path, adapter_path, max_new_tokens, dtype, trust_remote_code, predictions_file)
        render_region_prompt(prompt_template, "[0, 0, 1, 1]")  # refuse a bad template before loading anything
        get_codec(coord_format, **(codec_options or {}))  # and an unknown format
        self.save_hyperparameters()
        self.coord_format = coord_format
        self.prompt_template = prompt_template
        self.codec_options = dict(codec_options or {})
        self.metric = CaptionScores(metrics=tuple(metrics))

    def score_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        images = [s["image"] for s in batch]
        codecs = image_codecs(self.coord_format, self.codec_options, self.processor, images)
        regions = [[float(v) for v in s["region"].tolist()] for s in batch]
        prompts = [render_region_prompt(self.prompt_template, c.encode(r, s["image_size"]))
                   for s, r, c in zip(batch, regions, codecs)]
        answers = self.generate(prompts, images)
        captions = [c.strip(a) for c, a in zip(codecs, answers)]
        self.metric.update(captions, [s["references"] for s in batch])
        return [{"prompt": p, "generation": a, "caption": c, "references": s["references"],
                 "region": [round(v, 2) for v in r], "image_size": list(s["image_size"])}
                for s, p, a, c, r in zip(batch, prompts, answers, captions, regions)]

    def compute_metrics(self) -> dict[str, float]:
        return {name: float(v) for name, v in self.metric.compute().items()}

    def reset_metrics(self) -> None:
        self.metric.reset()

"""What every generate-then-score evaluator shares: a frozen policy, greedy batched answers, a JSONL per rank.

:class:`GenerativeEvaluator` is the base of the region-captioning and POPE evaluators
(:mod:`spr_lightning.captioning`, :mod:`spr_lightning.pope`): it loads the policy (and an optional LoRA adapter)
once, answers prompts about images greedily in left-padded batches (each prompt rendered by the model's own chat
template, :func:`datamodules.collate.user_message`), writes one JSONL line per sample and per rank, and runs the
same loop for ``validate`` and ``test``. A subclass only says how to score a batch and which metric to report.

:class:`spr_lightning.evaluation.GroundingEvaluator` (REC, phrase grounding) is a subclass too.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from datamodules.collate import user_message
from spr_lightning.coords import Codec, get_codec
from spr_lightning.models import load_policy, load_processor

__all__ = [
    "GenerativeEvaluator", "format_metric_table", "greedy_generate", "image_codecs", "load_eval_policy",
    "model_input_sizes",
]


def format_metric_table(metrics: dict[str, float], title: str) -> str:
    """A plain-text table, values in percent (as papers report them)."""
    width = max([len("metric"), *map(len, metrics)])
    rule = f"+-{'-' * width}-+---------+"
    rows = [f"| {name:<{width}} | {100 * value:7.2f} |" for name, value in metrics.items()]
    return "\n".join([title, rule, f"| {'metric':<{width}} | {'value %':>7} |", rule, *rows, rule])


def load_eval_policy(
    model_name_or_path: str, adapter_path: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
) -> nn.Module:
    """The policy (plus a LoRA adapter, unmerged) frozen in eval mode."""
    model = load_policy(model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def greedy_generate(
    policy: nn.Module, processor: Any, prompts: list[str], images: list[Any], max_new_tokens: int
) -> list[str]:
    """Greedy answers to ``prompts`` about ``images`` (one image each), special tokens dropped, stripped.

    The processor's tokenizer must pad on the left, so that every row continues from its own last token.
    """
    texts = [processor.apply_chat_template(user_message(p, True), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    kwargs: dict[str, Any] = {"text": texts, "images": images, "padding": True, "return_tensors": "pt"}
    tokenizer = processor.tokenizer
    bos = getattr(tokenizer, "bos_token", None)
    if bos and all(t.startswith(bos) for t in texts):
        kwargs["add_special_tokens"] = False  # the chat template already wrote BOS
    param = next(policy.parameters())
    inputs = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
              if isinstance(v, Tensor) else v for k, v in processor(**kwargs).items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def model_input_sizes(processor: Any, images: list[Any]) -> list[tuple[int, int]] | None:
    """``(W', H')`` of each image as the model sees it, where the processor reports a patch grid (Qwen2-VL
    family: ``image_grid_thw`` x ``patch_size``); None otherwise."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    if image_processor is None or not isinstance(patch, int):
        return None
    grid = image_processor(images=images, return_tensors="pt").get("image_grid_thw")
    if grid is None:
        return None
    return [(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()]


def image_codecs(coord_format: str, codec_options: dict[str, Any], processor: Any, images: list[Any]) -> list[Codec]:
    """One codec per image. Qwen2.5-VL reads and writes absolute pixels of its *resized* input, so without a
    ``resized_size`` option each image gets a codec for the size the processor gives it (exact for any
    ``min_pixels``/``max_pixels``); every other format shares one codec."""
    if coord_format == "qwen2_5_vl" and "resized_size" not in codec_options:
        sizes = model_input_sizes(processor, images)
        if sizes is not None:
            return [get_codec("qwen2_5_vl", **{**codec_options, "resized_size": s}) for s in sizes]
    return [get_codec(coord_format, **codec_options)] * len(images)


class GenerativeEvaluator(LightningModule, ABC):
    """Base of the generate-then-score evaluators; use a subclass with ``validate`` or ``test``.

    Subclasses implement :meth:`score_batch` (generate, update metrics, return one JSONL record per sample),
    :meth:`compute_metrics` and :meth:`reset_metrics`, and document their constructor (it is the config schema).

    Args:
        model_name_or_path: policy VLM (hub id, local path or ``tiny:<family>``).
        adapter_path: a trained LoRA adapter applied on top, unmerged.
        max_new_tokens: generation length limit.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        trust_remote_code: allow custom model code from the hub.
        predictions_file: JSONL of per-sample predictions; ``{rank}`` is replaced by the global rank. Default:
            ``<trainer.log_dir>/predictions-rank<r>.jsonl``.
    """

    #: the benchmark's name in the printed table's title
    task_name = "generation"

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: str | None = None,
        max_new_tokens: int = 64,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        predictions_file: str | None = None,
    ) -> None:
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.adapter_path = adapter_path
        self.max_new_tokens = max_new_tokens
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.predictions_file = predictions_file
        self.processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.policy: nn.Module | None = None
        self._writer = None
        self._num_samples = 0

    def configure_model(self) -> None:
        """Load the policy (and adapter) once, frozen, in eval mode."""
        if self.policy is None:
            self.policy = load_eval_policy(self.model_name_or_path, self.adapter_path, self.dtype_name,
                                           self.trust_remote_code)

    def generate(self, prompts: list[str], images: list[Any]) -> list[str]:
        """Greedy answers (see :func:`greedy_generate`); tests replace this to feed fixed answers."""
        if self.policy is None:
            self.configure_model()
        return greedy_generate(self.policy, self.processor, prompts, images, self.max_new_tokens)

    # ------------------------------------------------------------------------------ subclass interface
    @abstractmethod
    def score_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer and score one batch; one JSON-able record per sample (``key`` is added by the caller)."""

    @abstractmethod
    def compute_metrics(self) -> dict[str, float]:
        """Global metric values of the epoch (already synced across ranks)."""

    @abstractmethod
    def reset_metrics(self) -> None:
        """Forget the epoch's metric state (and any per-epoch counters)."""

    def describe(self) -> list[str]:
        """Parts of the printed table's title after the stage name."""
        return [self.task_name, self.model_name_or_path]

    def extra_counts(self) -> dict[str, int]:
        """Counters of this rank shown after the sample count (summed over ranks), e.g. ``{"phrases": 6}``."""
        return {}

    # ------------------------------------------------------------------------------ epoch bookkeeping
    def _predictions_path(self) -> Path:
        rank = self.global_rank
        if self.predictions_file is not None:
            return Path(self.predictions_file.replace("{rank}", str(rank)))
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        return Path(log_dir or ".") / f"predictions-rank{rank}.jsonl"

    def _epoch_start(self) -> None:
        self.reset_metrics()
        self._num_samples = 0
        path = self._predictions_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = path.open("w", encoding="utf-8")

    def _step(self, batch: list[dict[str, Any]]) -> None:
        for sample, record in zip(batch, self.score_batch(batch)):
            if self._writer is not None:
                self._writer.write(json.dumps({"key": sample["key"], **record}) + "\n")
        self._num_samples += len(batch)

    def _epoch_end(self, stage: str) -> dict[str, float]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        values = self.compute_metrics()
        extra = self.extra_counts()
        self.reset_metrics()
        # already global values; averaging identical values across ranks keeps Lightning's logging consistent
        self.log_dict({f"{stage}/{name}": v for name, v in values.items()}, sync_dist=True)
        counts = [self._num_samples, *extra.values()]
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(torch.tensor(counts, device=self.device), reduce_op="sum").tolist()
        if self._trainer is None or self.trainer.is_global_zero:
            what = f"{int(counts[0])} samples" + "".join(f", {int(n)} {name}" for name, n in zip(extra, counts[1:]))
            title = f"{stage} " + " | ".join([*self.describe(), what])
            print(format_metric_table(values, title), flush=True)
        return values

    def on_validation_epoch_start(self) -> None:
        self._epoch_start()

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._step(batch)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._epoch_start()

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

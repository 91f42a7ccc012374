"""``POPEEvaluator``: object hallucination on POPE (SPR Tab. 6) with ``python -m spr_lightning validate``.

Each yes/no question ("Is there a dog in the image?") is put to the model about its image, answered greedily,
and read with POPE's own rule (:func:`spr_lightning.metrics.pope.parse_pope_answer`); accuracy, precision,
recall, F1 and yes-ratio are reported per split (random / popular / adversarial), averaged over the splits and
pooled (:class:`spr_lightning.metrics.POPEMetrics`). Data: :class:`datamodules.pope.POPEDataModule`.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from spr_lightning.generate_utils import GenerativeEvaluator
from spr_lightning.metrics import POPEMetrics
from spr_lightning.metrics.pope import POPE_SPLITS, parse_pope_answer

__all__ = ["DEFAULT_POPE_PROMPT", "LLAVA_POPE_PROMPT", "POPEEvaluator"]

#: The question as POPE asks it.
DEFAULT_POPE_PROMPT = "{question}"
#: LLaVA-1.5's evaluation prompt (its ``llava_pope_test.jsonl``), which lmms-eval keeps for LLaVA-family models.
LLAVA_POPE_PROMPT = "{question}\nAnswer the question using a single word or phrase."


class POPEEvaluator(GenerativeEvaluator):
    """Scores a policy on POPE; use with ``validate`` or ``test``.

    Args:
        model_name_or_path: policy VLM (hub id, local path or ``tiny:<family>``).
        adapter_path: a trained LoRA adapter applied on top, unmerged.
        prompt_template: the question sent; ``{question}`` is POPE's question. Default: the question alone, as
            POPE asks it; :data:`LLAVA_POPE_PROMPT` adds LLaVA-1.5's short-answer instruction.
        max_new_tokens: generation length limit (only the first sentence is read).
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        trust_remote_code: allow custom model code from the hub.
        predictions_file: JSONL of per-sample predictions; ``{rank}`` is replaced by the global rank. Default:
            ``<trainer.log_dir>/predictions-rank<r>.jsonl``.
        splits: the split names the datamodule may use (the keys of its ``question_files``).
    """

    task_name = "pope"

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: str | None = None,
        prompt_template: str = DEFAULT_POPE_PROMPT,
        max_new_tokens: int = 32,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        predictions_file: str | None = None,
        splits: Sequence[str] = POPE_SPLITS,
    ) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt_template) if name is not None}
        if fields != {"question"}:
            raise ValueError(f"prompt_template must use exactly the field {{question}}, got {sorted(fields)}")
        super().__init__(model_name_or_path, adapter_path, max_new_tokens, dtype, trust_remote_code, predictions_file)
        self.save_hyperparameters()
        self.prompt_template = prompt_template
        self.metric = POPEMetrics(splits=tuple(splits))

    def score_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [self.prompt_template.format(question=s["question"]) for s in batch]
        answers = self.generate(prompts, [s["image"] for s in batch])
        labels, splits = [s["label"] for s in batch], [s["split"] for s in batch]
        self.metric.update(answers, labels, splits)
        return [{"split": sp, "question_id": s["question_id"], "prompt": p, "generation": a,
                 "answer": parse_pope_answer(a), "label": lab}
                for s, p, a, lab, sp in zip(batch, prompts, answers, labels, splits)]

    def compute_metrics(self) -> dict[str, float]:
        return {name: float(v) for name, v in self.metric.compute().items()}

    def reset_metrics(self) -> None:
        self.metric.reset()

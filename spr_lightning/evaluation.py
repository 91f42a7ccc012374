"""``GroundingEvaluator``: the evaluation stage (``python -m spr_lightning validate``), SPR §4 grounding tasks.

One LightningModule scores a policy on referring expression comprehension (RefCOCO/+/g, Acc@IoU) or phrase
grounding (Flickr30k Entities, Recall@k): it fills a prompt template per sample, generates greedily in
left-padded batches, reads boxes out of the text with the model's coordinate codec and updates DDP-synced
torchmetrics. Every sample's prompt, generation, boxes and ground truth go to a JSONL file per rank, so a
score can always be traced back to what the model wrote.

How generated boxes are matched to what is asked (plain functions below, tested on their own):

* REC: the first decoded box; a generation without a readable box is a miss (a NaN row).
* phrase grounding: :func:`assign_phrase_boxes`, by phrase text first, then by order of mention.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from spr_lightning.boxes import Box, enclosing_box
from spr_lightning.coords import Codec, Grounding, get_codec
from spr_lightning.generate_utils import GenerativeEvaluator, format_metric_table, image_codecs, model_input_sizes
from spr_lightning.metrics import AccuracyAtIoU, PhraseGroundingRecall
from spr_lightning.metrics.accuracy import paired_iou

__all__ = [
    "DEFAULT_PROMPTS",
    "GroundingEvaluator",
    "assign_phrase_boxes",
    "format_metric_table",
    "join_phrases",
    "normalize_phrase",
    "rec_box",
]

#: Prompt template per task. ``{expression}``: the referring expression; ``{phrases}``: the phrases joined by
#: :func:`join_phrases`; ``{caption}``: the whole caption. The phrase prompt is Ferret's, which SPR follows. The
#: REC prompt ends with the expression, as MiniGPT-v2's ("give me the location of ..."): right before the answer,
#: where a small language model reads it (on SPR-Shapes, "Where is X? Answer with a bounding box." left the
#: expression out of reach of the answer position; docs/results.md).
DEFAULT_PROMPTS = {
    "rec": "Give the bounding box of {expression}.",
    "phrase": "What are the locations of {phrases}?",
}
_FIELDS = {"rec": {"expression"}, "phrase": {"phrases", "caption"}}
_ARTICLES = frozenset({"a", "an", "the"})
_NAN_BOX = (math.nan,) * 4


# ------------------------------------------------------------------------------------------ pure logic
def normalize_phrase(text: str | None) -> str:
    """Lower case, punctuation and articles (a, an, the) removed, single spaces: ``"The Man,"`` -> ``"man"``."""
    if not text:
        return ""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def join_phrases(phrases: Sequence[str]) -> str:
    """Phrases as Ferret's Flickr evaluation lists them in the question: lower case, commas removed, ``", "``."""
    return ", ".join(p.replace(",", "").strip().lower() for p in phrases)


def rec_box(groundings: Sequence[Grounding]) -> Box:
    """The REC answer: the first decoded box, or a NaN box (scored as a miss) when there is none."""
    return groundings[0].xyxy if groundings else _NAN_BOX


def _mentions(groundings: Sequence[Grounding]) -> list[tuple[str, list[Box]]]:
    """Consecutive boxes decoded with the same phrase are one mention ("two dogs [a], [b]")."""
    out: list[tuple[str, list[Box]]] = []
    previous: object = object()
    for g in groundings:
        if out and g.phrase is not None and g.phrase == previous:
            out[-1][1].append(g.xyxy)
        else:
            out.append((normalize_phrase(g.phrase), [g.xyxy]))
        previous = g.phrase
    return out


def _contains(a: str, b: str) -> bool:
    """Whole-word containment either way ("man in red shirt" ~ "young man in red shirt")."""
    return bool(a) and bool(b) and (f" {a} " in f" {b} " or f" {b} " in f" {a} ")


def assign_phrase_boxes(phrases: Sequence[str], groundings: Sequence[Grounding]) -> list[list[Box]]:
    """Ranked predicted boxes for each asked phrase, from the boxes decoded out of one answer.

    The decoded boxes are first grouped into *mentions* (consecutive boxes sharing a decoded phrase). Then,
    comparing phrases after :func:`normalize_phrase`, each mention goes to at most one phrase:

    1. equal text: a phrase takes every such mention; when several asked phrases have the same text, the
       mentions are dealt out in order, one each, extra ones to the last of them;
    2. for phrases still without boxes, whole-word containment either way (the codec's phrase is a window of at
       most ``max_phrase_words`` words, so "man in a red shirt" must still find "a young man in a red shirt");
    3. for phrases still without boxes, the remaining mentions in order of mention, one each (the model
       usually answers in the order it was asked).

    A phrase's boxes keep their order in the answer (rank 1 = first written), as Ferret's evaluator ranks them.

    Returns:
        One list of pixel xyxy boxes per phrase (possibly empty: a phrase the answer did not ground).
    """
    mentions = _mentions(groundings)
    claimed = [False] * len(mentions)
    norms = [normalize_phrase(p) for p in phrases]
    out: list[list[Box]] = [[] for _ in phrases]
    for norm in dict.fromkeys(n for n in norms if n):
        owners = [i for i, n in enumerate(norms) if n == norm]
        found = [j for j, (m, _) in enumerate(mentions) if m == norm]
        for t, j in enumerate(found):
            out[owners[min(t, len(owners) - 1)]].extend(mentions[j][1])
            claimed[j] = True
    for i, norm in enumerate(norms):
        if out[i]:
            continue
        for j, (m, boxes) in enumerate(mentions):
            if not claimed[j] and _contains(m, norm):
                out[i].extend(boxes)
                claimed[j] = True
    rest = iter(j for j in range(len(mentions)) if not claimed[j])
    for i in range(len(phrases)):
        if not out[i]:
            j = next(rest, None)
            if j is None:
                break
            out[i] = list(mentions[j][1])
    return out


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _as_list(box: Sequence[float]) -> list[float] | None:
    values = [float(v) for v in box]
    return None if any(math.isnan(v) for v in values) else [round(v, 2) for v in values]


# ------------------------------------------------------------------------------------------ the module
class GroundingEvaluator(GenerativeEvaluator):
    """Scores a policy VLM on REC (Acc@IoU) or phrase grounding (Recall@k); use with ``validate`` or ``test``.

    Args:
        model_name_or_path: policy VLM (hub id, local path or ``tiny:<family>``).
        adapter_path: a trained LoRA adapter (e.g. the DPO stage's export) applied on top, unmerged.
        coord_format: the codec the model writes boxes in (``ferret``, ``qwen2_5_vl``, ...; see
            ``spr_lightning.coords``).
        task: ``rec`` (one box per expression) or ``phrase`` (all phrases of a caption in one question).
        prompt_template: question template; default :data:`DEFAULT_PROMPTS` of the task. Fields: ``{expression}``
            (rec), ``{phrases}`` and ``{caption}`` (phrase).
        max_new_tokens: generation length limit.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        trust_remote_code: allow custom model code from the hub (off unless set).
        predictions_file: JSONL of per-sample predictions; ``{rank}`` is replaced by the global rank. Default:
            ``<trainer.log_dir>/predictions-rank<r>.jsonl``.
        codec_options: constructor options of the codec (e.g. ``{"square_pad": false}``). For ``qwen2_5_vl``
            without ``resized_size`` the model's input size is read from the processor per image (exact).
        iou_thresholds: IoU thresholds; default 0.5-0.9 for rec (SPR Table 2), 0.5 for phrase.
        recall_k: ranks reported for phrase grounding (``recall@1``, ...).
        phrase_mode: ``merged`` (MERGED-BOXES, SPR/Ferret) or ``any`` (ANY-BOX) ground truth of a phrase.
        merge_predicted: phrase task: enclose all boxes predicted for a phrase in one box before scoring. Off
            by default: Ferret's evaluator, which SPR follows, scores the first box.
        inclusive: rec: a hit is IoU >= t (True; Ferret, Qwen-VL) or IoU > t (False; Shikra).
    """

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: str | None = None,
        coord_format: str = "ferret",
        task: str = "rec",
        prompt_template: str | None = None,
        max_new_tokens: int = 64,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        predictions_file: str | None = None,
        codec_options: dict[str, Any] | None = None,
        iou_thresholds: list[float] | None = None,
        recall_k: list[int] | None = None,
        phrase_mode: str = "merged",
        merge_predicted: bool = False,
        inclusive: bool = True,
    ) -> None:
        if task not in DEFAULT_PROMPTS:
            raise ValueError(f"task must be one of {sorted(DEFAULT_PROMPTS)}, got {task!r}")
        template = prompt_template or DEFAULT_PROMPTS[task]
        unknown = _template_fields(template) - _FIELDS[task]
        if unknown:
            raise ValueError(f"prompt_template field(s) {sorted(unknown)} unknown for task {task!r}; "
                             f"available: {sorted(_FIELDS[task])}")
        super().__init__(model_name_or_path, adapter_path, max_new_tokens, dtype, trust_remote_code, predictions_file)
        self.save_hyperparameters()
        self.prompt_template = template
        self.codec_options = dict(codec_options or {})
        self.codec: Codec = get_codec(coord_format, **self.codec_options)
        if task == "rec":
            self.metric = AccuracyAtIoU(thresholds=iou_thresholds or (0.5, 0.6, 0.7, 0.8, 0.9), inclusive=inclusive)
        else:
            self.metric = PhraseGroundingRecall(k=recall_k or (1,), iou_thresholds=iou_thresholds or (0.5,),
                                                mode=phrase_mode)
        self._phrases = 0  # scored phrases on this rank

    @property
    def task_name(self) -> str:
        return self.hparams.task

    def describe(self) -> list[str]:
        return [self.hparams.task, self.model_name_or_path, self.hparams.coord_format]

    def extra_counts(self) -> dict[str, int]:
        return {"phrases": self._phrases} if self.hparams.task == "phrase" else {}

    def render_prompt(self, sample: dict[str, Any]) -> str:
        """The question of one sample (template fields filled from the sample)."""
        if self.hparams.task == "rec":
            return self.prompt_template.format(expression=sample["expression"])
        return self.prompt_template.format(phrases=join_phrases(sample["phrases"]), caption=sample["caption"])

    def model_input_sizes(self, images: list[Any]) -> list[tuple[int, int]] | None:
        """``(W', H')`` of each image as the model sees it (see :func:`generate_utils.model_input_sizes`)."""
        return model_input_sizes(self.processor, images)

    def _codecs(self, images: list[Any]) -> list[Codec]:
        return image_codecs(self.hparams.coord_format, self.codec_options, self.processor, images)

    # ---------------------------------------------------------------------------------------- scoring
    def _score_rec(self, batch: list[dict[str, Any]], answers: list[str], codecs: list[Codec]) -> list[dict]:
        preds = torch.tensor([rec_box(c.decode(a, s["image_size"])) for s, a, c in zip(batch, answers, codecs)],
                             dtype=torch.float32).reshape(-1, 4)
        targets = torch.stack([s["target"].float().cpu() for s in batch]).reshape(-1, 4)
        self.metric.update(preds.to(self.device), targets.to(self.device))
        readable = torch.isfinite(preds).all(dim=-1, keepdim=True)
        ious = paired_iou(torch.where(readable, preds, torch.zeros_like(preds)), targets) * readable[:, 0]
        return [{"pred_box": _as_list(p), "gt_box": _as_list(t), "iou": round(float(i), 4)}
                for p, t, i in zip(preds.tolist(), targets.tolist(), ious.tolist())]

    def _score_phrase(self, batch: list[dict[str, Any]], answers: list[str], codecs: list[Codec]) -> list[dict]:
        all_preds: list[Tensor] = []
        all_targets: list[Tensor] = []
        records = []
        for sample, answer, codec in zip(batch, answers, codecs):
            assigned = assign_phrase_boxes(sample["phrases"], codec.decode(answer, sample["image_size"]))
            if self.hparams.merge_predicted:
                assigned = [[enclosing_box(boxes)] if boxes else [] for boxes in assigned]
            all_preds.extend(torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in assigned)
            all_targets.extend(t.float().cpu().reshape(-1, 4) for t in sample["targets"])
            self._phrases += sum(int(t.numel() > 0) for t in sample["targets"])
            records.append({"phrases": sample["phrases"],
                            "pred_boxes": [[_as_list(b) for b in boxes] for boxes in assigned],
                            "gt_boxes": [[_as_list(b) for b in t.tolist()] for t in sample["targets"]]})
        self.metric.update([p.to(self.device) for p in all_preds], [t.to(self.device) for t in all_targets])
        return records

    def score_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [self.render_prompt(s) for s in batch]
        images = [s["image"] for s in batch]
        answers = self.generate(prompts, images)
        codecs = self._codecs(images)
        score = self._score_rec if self.hparams.task == "rec" else self._score_phrase
        return [{"prompt": prompt, "generation": answer, "image_size": list(sample["image_size"]), **record}
                for sample, prompt, answer, record in zip(batch, prompts, answers, score(batch, answers, codecs))]

    def compute_metrics(self) -> dict[str, float]:
        return {name: float(v) for name, v in self.metric.compute().items()}

    def reset_metrics(self) -> None:
        self.metric.reset()
        self._phrases = 0

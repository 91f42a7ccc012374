"""POPE (Li et al., EMNLP 2023): object-hallucination probing with yes/no questions, scored as POPE scores it.

An answer is read exactly as POPE's own ``evaluate.py`` reads it (RUCAIBox/POPE; LLaVA's ``eval_pope.py`` is
the same code): keep the text before the first ``.``, drop commas, split on single spaces; the answer is
**no** when one of the words is exactly ``No``, ``not`` or ``no``, and **yes** otherwise. So ``"I cannot tell"``
and ``"NO"`` count as *yes*, as they do in every published POPE number. "yes" is the positive class:

* accuracy = (TP + TN) / N, precision = TP / (TP + FP), recall = TP / (TP + FN),
  F1 = 2 P R / (P + R), yes-ratio = (TP + FP) / N.

Where POPE's script would divide by zero, the value is 0. Counts are DDP-synced by summing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["POPE_METRICS", "POPE_SPLITS", "POPEMetrics", "parse_pope_answer", "pope_metrics"]

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_NEGATIVE_WORDS = frozenset({"No", "not", "no"})
_TP, _FP, _TN, _FN = range(4)


def parse_pope_answer(text: str) -> str:
    """``"yes"`` or ``"no"``, by POPE's rule (module docstring): ``"No, there is not."`` -> ``"no"``,
    ``"Yes."`` -> ``"yes"``, ``"I cannot tell"`` -> ``"yes"`` (no negative word)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in _NEGATIVE_WORDS for w in words) else "yes"


def _label(value: str, index: int) -> bool:
    label = value.strip().lower() if isinstance(value, str) else value
    if label not in ("yes", "no"):
        raise ValueError(f"labels[{index}] must be 'yes' or 'no', got {value!r}")
    return label == "yes"


def _pope_update(answers: Sequence[str], labels: Sequence[str]) -> Tensor:
    """``[TP, FP, TN, FN]`` of a batch of raw answers (parsed here) against ``"yes"``/``"no"`` labels."""
    if isinstance(answers, str) or len(answers) != len(labels):
        raise ValueError(f"answers and labels must be lists of the same length, got {len(answers)} and {len(labels)}")
    counts = torch.zeros(4, dtype=torch.long)
    for i, (answer, label) in enumerate(zip(answers, labels)):
        said_yes, is_yes = parse_pope_answer(answer) == "yes", _label(label, i)
        counts[(_TP if is_yes else _FP) if said_yes else (_FN if is_yes else _TN)] += 1
    return counts


def _pope_compute(counts: Tensor) -> dict[str, Tensor]:
    """The five POPE numbers from ``[TP, FP, TN, FN]``."""
    tp, fp, tn, fn = (float(v) for v in counts.tolist())
    total = tp + fp + tn + fn

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    values = {"accuracy": ratio(tp + tn, total), "precision": precision, "recall": recall,
              "f1": ratio(2 * precision * recall, precision + recall), "yes_ratio": ratio(tp + fp, total)}
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, Tensor]:
    """Functional :class:`POPEMetrics` (one split) on one batch: keys :data:`POPE_METRICS`."""
    return _pope_compute(_pope_update(answers, labels))


class POPEMetrics(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio, overall or per split.

    Args:
        splits: split names (POPE: :data:`POPE_SPLITS`). None: one pool, keys :data:`POPE_METRICS`. Given: every
            update names each answer's split, and :meth:`compute` reports ``"<split>/<metric>"`` for each split
            that received answers (on any rank), ``"avg/<metric>"`` (the mean over those splits: one number per
            metric, as a single POPE column of a results table) and ``"all/<metric>"`` (all answers pooled).
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = POPEMetrics()
        >>> m.update(["Yes.", "no, there is not", "I cannot tell"], ["yes", "no", "no"])
        >>> {k: round(float(v), 3) for k, v in m.compute().items()}
        {'accuracy': 0.667, 'precision': 0.5, 'recall': 1.0, 'f1': 0.667, 'yes_ratio': 0.667}
    """

    is_differentiable = False
    higher_is_better = True  # for accuracy, precision, recall and F1; yes_ratio is best near the data's 0.5
    full_state_update = False
    counts: Tensor

    def __init__(self, splits: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.splits = tuple(splits) if splits is not None else None
        if self.splits is not None and (not self.splits or len(set(self.splits)) != len(self.splits)):
            raise ValueError(f"splits must be distinct names, got {splits!r}")
        self.add_state("counts", torch.zeros(len(self.splits or (None,)), 4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str], labels: Sequence[str], splits: Sequence[str] | None = None) -> None:
        """Add a batch.

        Args:
            answers: the model's raw answers (parsed with :func:`parse_pope_answer`).
            labels: ``"yes"`` / ``"no"`` ground truth.
            splits: each answer's split; required exactly when the metric was built with ``splits``.
        """
        if self.splits is None:
            if splits is not None:
                raise ValueError("this POPEMetrics has no splits; build it with splits=... to pass them")
            self.counts[0] += _pope_update(answers, labels).to(self.counts.device)
            return
        if splits is None or len(splits) != len(answers):
            raise ValueError(f"pass one split (of {self.splits}) per answer")
        unknown = set(splits) - set(self.splits)
        if unknown:
            raise ValueError(f"unknown POPE split(s) {sorted(unknown)}; known: {self.splits}")
        for j, name in enumerate(self.splits):
            rows = [i for i, s in enumerate(splits) if s == name]
            counts = _pope_update([answers[i] for i in rows], [labels[i] for i in rows])
            self.counts[j] += counts.to(self.counts.device)

    def compute(self) -> dict[str, Tensor]:
        """Values in [0, 1]; keys as described in the class docstring."""
        if self.splits is None:
            return _pope_compute(self.counts[0])
        out: dict[str, Tensor] = {}
        seen = [j for j in range(len(self.splits)) if self.counts[j].sum() > 0]
        per_split = [_pope_compute(self.counts[j]) for j in seen]
        for j, values in zip(seen, per_split):
            out.update({f"{self.splits[j]}/{k}": v for k, v in values.items()})
        for key in POPE_METRICS:
            values = [v[key] for v in per_split] or [torch.tensor(0.0, dtype=torch.float64)]
            out[f"avg/{key}"] = torch.stack(values).mean()
        out.update({f"all/{k}": v for k, v in _pope_compute(self.counts.sum(dim=0)).items()})
        return out

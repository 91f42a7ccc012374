"""Caption metrics of the COCO caption toolkit (``pycocoevalcap``), as a DDP-aware torchmetrics ``Metric``.

SPR Tab. 4 reports region captioning with METEOR and ROUGE_L. The numbers are those of ``pycocoevalcap``
itself, computed exactly as its ``COCOEvalCap.evaluate`` does: candidates and references are lower-cased and
tokenised by the Stanford PTB tokenizer (punctuation dropped), then every scorer sees the whole corpus at once.
Nothing is re-implemented here: METEOR is the METEOR 1.5 jar, ROUGE_L the toolkit's LCS F-measure with
β = 1.2, BLEU and CIDEr (CIDEr-D) its own scorers.

These scores are corpus-level (METEOR sums statistics over segments before scoring, CIDEr takes document
frequencies over the corpus), so they cannot be averaged across GPUs: the metric keeps the strings, gathers
them from every rank (``torch.distributed.all_gather_object``), puts them in one canonical order and scores the
whole corpus once, on the first rank of the group, which then broadcasts the numbers.

Java must be on ``PATH``: the PTB tokenizer and METEOR are Java programs shipped inside ``pycocoevalcap``.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CAPTION_METRICS", "CaptionScores", "caption_scores"]

#: Score names, spelled as ``COCOEvalCap`` reports them.
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

_meteor_lock = threading.Lock()
_meteor: tuple[int, Any] | None = None  # (pid, pycocoevalcap Meteor): one METEOR JVM per process, started lazily


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if m not in CAPTION_METRICS]
    if not names or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {CAPTION_METRICS}, got {metrics!r}")
    return names


def _check_inputs(preds: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(preds, str) or len(preds) != len(references):
        raise ValueError("preds must be a list of strings with one list of references each, got "
                         f"{type(preds).__name__} of length {len(preds)} and {len(references)} reference lists")
    out_refs = []
    for i, (pred, refs) in enumerate(zip(preds, references)):
        if not isinstance(pred, str):
            raise ValueError(f"preds[{i}] must be a string, got {type(pred).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
        out_refs.append(list(refs))
    return list(preds), out_refs


def _require_toolkit() -> None:
    """Fail early, naming what is missing, instead of pycocoevalcap's bare FileNotFoundError from Popen."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ImportError("caption metrics need the COCO caption toolkit: pip install pycocoevalcap") from None
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR 1.5 are "
                           "Java programs (install a Java runtime, e.g. `apt-get install default-jre-headless`)")


def _shared_meteor() -> Any:
    """This process's METEOR scorer. Starting the JVM and loading METEOR's paraphrase table takes seconds, and the
    scorer is stateless between calls, so it is started once; a forked child starts its own (pipes can't be
    shared)."""
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor is None or _meteor[0] != os.getpid():
            _meteor = (os.getpid(), Meteor())
        return _meteor[1]


def _scorers(metrics: tuple[str, ...]) -> list[tuple[Any, tuple[str, ...]]]:
    """``(scorer, names it yields)`` for the requested names, each scorer once (BLEU gives all four orders)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: list[tuple[Any, tuple[str, ...]]] = []
    if any(m.startswith("Bleu_") for m in metrics):
        out.append((Bleu(4), CAPTION_METRICS[:4]))
    if "METEOR" in metrics:
        out.append((_shared_meteor(), ("METEOR",)))
    if "ROUGE_L" in metrics:
        out.append((Rouge(), ("ROUGE_L",)))
    if "CIDEr" in metrics:
        out.append((Cider(), ("CIDEr",)))
    return out


def _caption_scores_compute(
    preds: Sequence[str], references: Sequence[Sequence[str]], metrics: tuple[str, ...]
) -> dict[str, float]:
    """Score a whole corpus as ``COCOEvalCap.evaluate`` does; 0 for every metric on an empty corpus.

    The samples are first sorted by content, so the result does not depend on how they were split across ranks
    (the scores are order-free mathematically; sorting makes them bit-identical too).
    """
    if not preds:
        return dict.fromkeys(metrics, 0.0)
    _require_toolkit()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pairs = sorted(zip((tuple(r) for r in references), preds))
    gts = {i: [{"caption": r} for r in refs] for i, (refs, _) in enumerate(pairs)}
    res = {i: [{"caption": pred}] for i, (_, pred) in enumerate(pairs)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)  # two calls, as COCOEvalCap makes them
    values: dict[str, float] = {}
    for scorer, names in _scorers(metrics):
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            values[name] = float(value)
    return {m: values[m] for m in metrics}


def caption_scores(
    preds: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = ("METEOR", "ROUGE_L")
) -> dict[str, float]:
    """Functional :class:`CaptionScores` on one corpus (same arguments and keys)."""
    names = _check_metrics(metrics)
    preds, refs = _check_inputs(preds, references)
    return _caption_scores_compute(preds, refs, names)


class CaptionScores(Metric):
    """COCO caption scores (``pycocoevalcap``) of generated captions against reference captions.

    Args:
        metrics: names among :data:`CAPTION_METRICS` (``"METEOR"``, ``"ROUGE_L"``, ``"CIDEr"``, ``"Bleu_4"``...),
            the keys of :meth:`compute`. SPR Tab. 4 reports METEOR and ROUGE_L.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``...). The strings
            are gathered with ``all_gather_object``, so a custom ``dist_sync_fn`` (a tensor gather) is not used.

    Example:
        >>> m = CaptionScores(metrics=("ROUGE_L",))
        >>> m.update(["a man on a horse"], [["a man riding a horse", "a horse rider"]])
        >>> m.compute()  # doctest: +SKIP
        {'ROUGE_L': tensor(0.8000, dtype=torch.float64)}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    preds: list[str]
    references: list[list[str]]

    def __init__(self, metrics: Sequence[str] = ("METEOR", "ROUGE_L"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = _check_metrics(metrics)
        self.add_state("preds", default=[], dist_reduce_fx=None)
        self.add_state("references", default=[], dist_reduce_fx=None)

    def update(self, preds: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add candidates and their references.

        Args:
            preds: one generated caption per sample (boxes already stripped).
            references: the reference captions of each sample (at least one each).
        """
        preds, refs = _check_inputs(preds, references)
        self.preds.extend(preds)
        self.references.extend(refs)

    def _apply(self, fn: Any, exclude_state: Sequence[str] = ()) -> CaptionScores:
        """Moving the metric (``.to(device)``, ``.half()``...) leaves the strings alone (torchmetrics would apply
        ``fn`` to every element of a list state)."""
        return super()._apply(fn, exclude_state=(*exclude_state, "preds", "references"))

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any | None = None) -> None:
        """Gather the strings of every rank (torchmetrics' own sync gathers tensors only)."""
        group = process_group or self.process_group
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (list(self.preds), list(self.references)), group=group)
        self.preds = [p for preds, _ in gathered for p in preds]
        self.references = [r for _, refs in gathered for r in refs]

    def compute(self) -> dict[str, Tensor]:
        """Corpus-level scores in [0, 1] (CIDEr in [0, 10]), keyed by the names given in ``metrics``.

        After a sync every rank holds the whole corpus; only the group's first rank runs the Java scorers and
        the others receive its numbers, so a node of 8 GPUs starts one METEOR JVM, not 8.
        """
        group = self.process_group
        if self._is_synced and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            box: list[Any] = [None]
            if dist.get_rank() == src:
                try:
                    box[0] = _caption_scores_compute(self.preds, self.references, self.metrics)
                except Exception as error:  # every rank must leave the broadcast, then all raise
                    box[0] = error
            dist.broadcast_object_list(box, src=src, group=group)
            if isinstance(box[0], Exception):
                raise box[0]
            values = box[0]
        else:
            values = _caption_scores_compute(self.preds, self.references, self.metrics)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}

"""Phrase-grounding Recall@k (Flickr30k Entities), with the two ground-truth protocols in use.

For each phrase the model ranks ``K_i`` boxes; the phrase is a hit at ``k`` when one of its top-``k`` boxes
reaches IoU >= threshold with the ground truth, as in MDETR's ``flickr_eval.py``. The ground truth of a phrase
with several boxes is, in

* ``mode="merged"`` (MERGED-BOXES, what SPR and Ferret report): their enclosing box;
* ``mode="any"`` (ANY-BOX, MDETR / Kosmos-2 default): any of them.

Phrases without a ground-truth box are skipped (neither hit nor counted), like MDETR. Predicted rows that are
not finite (a box the model's text did not yield) never hit; phrases with fewer than ``k`` predictions are
judged on what they have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import Metric

from kernels import batched_box_iou
from spr_lightning.metrics.accuracy import _check_thresholds

__all__ = ["PhraseGroundingRecall", "phrase_grounding_recall"]

MODES = ("merged", "any")
PhraseTypes = Sequence[str | Sequence[str]]


def _check_args(k: Sequence[int], mode: str) -> tuple[int, ...]:
    ks = tuple(int(v) for v in k)
    if not ks or any(v < 1 for v in ks):
        raise ValueError(f"k must be a non-empty sequence of positive integers, got {k!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return ks


def _type_mask(types: PhraseTypes | None, keep: list[int], known: tuple[str, ...], device: torch.device) -> Tensor:
    """``[P, len(known)]`` bool: which known types each kept phrase has (a phrase may have several)."""
    mask = torch.zeros(len(keep), len(known), dtype=torch.bool)
    if types is None or not known:
        return mask.to(device)
    index = {name: j for j, name in enumerate(known)}
    for row, i in enumerate(keep):
        names = [types[i]] if isinstance(types[i], str) else list(types[i])
        for name in names:
            if name not in index:
                raise ValueError(f"unknown phrase type {name!r}; known types: {known}")
            mask[row, index[name]] = True
    return mask.to(device)


def _best_iou_at_k(preds: list[Tensor], gts: list[Tensor], ks: tuple[int, ...]) -> Tensor:
    """``[P, len(ks)]``: the best IoU among each phrase's top-``k`` predictions, for every ``k``."""
    lp = torch.tensor([p.shape[0] for p in preds], device=preds[0].device)
    lg = torch.tensor([g.shape[0] for g in gts], device=gts[0].device)
    pred_pad, gt_pad = pad_sequence(preds, batch_first=True), pad_sequence(gts, batch_first=True)
    readable = torch.isfinite(pred_pad).all(dim=-1)  # padding rows are zeros, hence "readable" but IoU 0
    pred_pad = torch.where(readable[..., None], pred_pad, torch.zeros_like(pred_pad))
    iou = batched_box_iou(pred_pad, gt_pad, lp, lg, check_nan=False)  # 0 outside each phrase's lengths
    best = iou.masked_fill(~readable[..., None], 0.0).amax(dim=-1)  # [P, Kmax]: best ground truth per rank
    if best.shape[1] == 0:
        best = best.new_zeros(best.shape[0], 1)
    running = best.cummax(dim=-1).values
    cols = torch.tensor([min(k, running.shape[1]) - 1 for k in ks], device=running.device)
    return running[:, cols]


def _phrase_recall_update(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    ks: tuple[int, ...],
    thresholds: tuple[float, ...],
    mode: str,
    known_types: tuple[str, ...] = (),
    types: PhraseTypes | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hits ``[K, T]``, phrases counted, per-type hits ``[Y, K, T]`` and per-type counts ``[Y]`` of a batch."""
    if len(preds) != len(targets):
        raise ValueError(f"one prediction list per phrase: got {len(preds)} predictions for {len(targets)} phrases")
    if types is not None and len(types) != len(targets):
        raise ValueError(f"one type entry per phrase: got {len(types)} for {len(targets)} phrases")
    if device is None:
        device = torch.as_tensor(targets[0]).device if len(targets) else torch.device("cpu")
    keep = [i for i, t in enumerate(targets) if torch.as_tensor(t).numel() > 0]
    hits = torch.zeros(len(ks), len(thresholds), dtype=torch.long, device=device)
    type_hits = torch.zeros(len(known_types), len(ks), len(thresholds), dtype=torch.long, device=device)
    type_total = torch.zeros(len(known_types), dtype=torch.long, device=device)
    if not keep:
        return hits, torch.tensor(0, device=device), type_hits, type_total
    gts = [torch.as_tensor(targets[i]).to(device).float().reshape(-1, 4) for i in keep]
    if mode == "merged":
        gts = [torch.cat([g[:, :2].amin(dim=0), g[:, 2:].amax(dim=0)])[None] for g in gts]
    # Only the top max(k) ranks can matter.
    prs = [torch.as_tensor(preds[i]).to(device).float().reshape(-1, 4)[: max(ks)] for i in keep]
    best = _best_iou_at_k(prs, gts, ks)
    thr = torch.tensor(thresholds, device=device)
    hit = (best[..., None] >= thr).long()  # [P, K, T]
    mask = _type_mask(types, keep, known_types, device).long()  # [P, Y]
    type_hits = torch.einsum("pkt,py->ykt", hit, mask)
    return hit.sum(dim=0), torch.tensor(len(keep), device=device), type_hits, mask.sum(dim=0)


def _phrase_recall_compute(
    hits: Tensor,
    total: Tensor,
    ks: tuple[int, ...],
    thresholds: tuple[float, ...],
    known_types: tuple[str, ...] = (),
    type_hits: Tensor | None = None,
    type_total: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"recall@1": ...}`` (``"recall@1@0.7"`` with several thresholds), plus ``"<key>/<type>"`` per type."""

    def keyed(h: Tensor, n: Tensor, suffix: str = "") -> dict[str, Tensor]:
        frac = (h.double() / n.clamp(min=1).double()).float()
        out = {}
        for a, k in enumerate(ks):
            for b, t in enumerate(thresholds):
                key = f"recall@{k}" if len(thresholds) == 1 else f"recall@{k}@{t:g}"
                out[key + suffix] = frac[a, b]
        return out

    result = keyed(hits, total)
    for y, name in enumerate(known_types):
        result.update(keyed(type_hits[y], type_total[y], f"/{name}"))  # type: ignore[index]
    return result


def phrase_grounding_recall(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    k: Sequence[int] = (1,),
    iou_thresholds: Sequence[float] = (0.5,),
    mode: str = "merged",
    phrase_types: Sequence[str] | None = None,
    types: PhraseTypes | None = None,
) -> dict[str, Tensor]:
    """Functional :class:`PhraseGroundingRecall` on one batch (same arguments and keys)."""
    ks, thr = _check_args(k, mode), _check_thresholds(iou_thresholds)
    known = tuple(phrase_types or ())
    hits, total, type_hits, type_total = _phrase_recall_update(preds, targets, ks, thr, mode, known, types)
    return _phrase_recall_compute(hits, total, ks, thr, known, type_hits, type_total)


class PhraseGroundingRecall(Metric):
    """Recall@k of phrase grounding (Flickr30k Entities), DDP-synced by summing counts.

    Args:
        k: ranks to report (``recall@1``, ``recall@5``, ...).
        iou_thresholds: IoU thresholds (hit: IoU >= threshold); with more than one the keys carry the
            threshold, ``"recall@1@0.7"``.
        mode: ``"merged"`` (MERGED-BOXES) or ``"any"`` (ANY-BOX); see the module docstring.
        phrase_types: the phrase types to break results down by (e.g. Flickr30k's ``people``, ``clothing``,
            ``bodyparts``, ``animals``, ``vehicles``, ``instruments``, ``scene``, ``other``); adds keys
            ``"recall@1/people"``...
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: Tensor
    total: Tensor

    def __init__(
        self,
        k: Sequence[int] = (1,),
        iou_thresholds: Sequence[float] = (0.5,),
        mode: str = "merged",
        phrase_types: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.k = _check_args(k, mode)
        self.iou_thresholds = _check_thresholds(iou_thresholds)
        self.mode = mode
        self.phrase_types = tuple(phrase_types or ())
        shape = (len(self.k), len(self.iou_thresholds))
        self.add_state("hits", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if self.phrase_types:  # no empty states: gathering zero-size tensors is fragile across backends
            y = len(self.phrase_types)
            self.add_state("type_hits", torch.zeros((y, *shape), dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("type_total", torch.zeros(y, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Tensor], targets: Sequence[Tensor], types: PhraseTypes | None = None) -> None:
        """Add a batch of phrases.

        Args:
            preds: one ``[K_i, 4]`` tensor of ranked predicted pixel xyxy boxes per phrase (``K_i`` may be 0).
            targets: one ``[G_i, 4]`` tensor of ground-truth boxes per phrase; ``G_i = 0`` skips the phrase.
            types: per phrase, its type name or list of names (counted under each), when ``phrase_types``
                was given.
        """
        hits, total, type_hits, type_total = _phrase_recall_update(
            preds, targets, self.k, self.iou_thresholds, self.mode, self.phrase_types, types, self.hits.device
        )
        self.hits += hits
        self.total += total
        if self.phrase_types:
            self.type_hits += type_hits
            self.type_total += type_total

    def compute(self) -> dict[str, Tensor]:
        """Recall fractions in [0, 1]; 0 when no phrase was counted."""
        type_hits = getattr(self, "type_hits", None)
        type_total = getattr(self, "type_total", None)
        return _phrase_recall_compute(
            self.hits, self.total, self.k, self.iou_thresholds, self.phrase_types, type_hits, type_total
        )

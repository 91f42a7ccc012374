"""Phrase-matched localization score: each written box against the grounder's boxes for *its own phrase*.

**Not the paper's score** (that is Algorithm 1, :mod:`spr_lightning.scoring.localization`, our default). Why an
option exists: Algorithm 1 puts the grounder's boxes in both ``B_gt`` and ``B_pred``, so every object the grounder
finds for the description is already covered on the prediction side, and a written box adds to ``S_loc`` only
when it lands on an annotated object the grounder did *not* find. A box on the object its phrase names usually
scores the same as a box on nothing, and a box on some other, unnamed object can score higher (hand case in
``docs/results/notebook.md``, "Selection, not grounding"). On candidates that differ only in their boxes that ranks
binding errors above correct boxes. This score asks the question a grounding model should answer: is each box on
what its words name?

For one description with written boxes ``b_1 .. b_K`` (phrases ``p_1 .. p_K``, from the coordinate codec):

1. ``G_k``: the grounder's boxes for ``p_k`` alone on the crop (image pixels). A grounder box that matches an
   annotated box (IoU ``> snap_iou_threshold``, the de-duplication threshold 0.7) is replaced by the annotation, as
   Algorithm 1 lets annotations win over detector copies in ``B_gt``; then ``G_k`` is de-duplicated.
2. ``s_k = max_j IoU(b_k, G_k[j])``, set to 0 below ``iou_threshold`` (0.5, Algorithm 1 step 6). A box that
   repeats an earlier written box of the same description (IoU ``> dedup_iou_threshold``) scores 0: the same
   object written twice is one object found.
3. ``S_loc = mean_k s_k``; a description without boxes scores 0.

It is a precision score over the boxes a description writes: which objects to mention is left to ``S_sem`` (the
words), and a phrase the grounder cannot find (a hallucinated object) gives its box 0. Batched: step 2 for every
box of a batch is one :func:`kernels.localization_score` launch (one written box per set, its targets as
predictions). :func:`phrase_localization_score_reference` is the plain-Python transcription for tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import batched_box_iou, dedup_boxes, localization_score
from spr_lightning.scoring.localization import (
    DEFAULT_DEDUP_IOU_THRESHOLD,
    Box,
    BoxSet,
    _as_box,
    _dedup,
    _iou,
    pad_box_sets,
)

__all__ = [
    "phrase_localization_score_reference",
    "phrase_localization_scores",
    "phrase_targets",
    "phrase_targets_reference",
]


def phrase_targets(
    ground_sets: Sequence[BoxSet],
    anno_sets: Sequence[BoxSet],
    *,
    snap_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> list[list[Box]]:
    """Step 1 for many phrases at once: each grounder box snapped to its best annotation (IoU ``>`` the
    threshold) when there is one, then de-duplicated in order. ``anno_sets[i]`` are the region's annotations."""
    if len(ground_sets) != len(anno_sets):
        raise ValueError(f"need one annotation set per grounder set, got {len(ground_sets)} and {len(anno_sets)}")
    if not ground_sets:
        return []
    ground_t, ground_len = pad_box_sets(ground_sets, device)
    anno_t, anno_len = pad_box_sets(anno_sets, device)
    iou = batched_box_iou(ground_t, anno_t, ground_len, anno_len, backend=backend)  # [P, G, A], padding: 0
    best_iou, best_anno = (t.cpu() for t in iou.max(dim=2))
    snapped: list[list[Box]] = []
    for i, ground in enumerate(ground_sets):
        boxes = []
        for j, box in enumerate(ground):
            if float(best_iou[i, j]) > snap_iou_threshold:
                boxes.append(_as_box(anno_sets[i][int(best_anno[i, j])]))
            else:
                boxes.append(_as_box(box))
        snapped.append(boxes)
    boxes_t, lengths = pad_box_sets(snapped, device)
    keep = dedup_boxes(boxes_t, lengths, iou_threshold=snap_iou_threshold, backend=backend).cpu()
    return [[s[j] for j in keep[i, : len(s)].nonzero().flatten().tolist()] for i, s in enumerate(snapped)]


def phrase_localization_scores(
    text_boxes: Sequence[BoxSet],
    box_targets: Sequence[Sequence[BoxSet]],
    *,
    iou_threshold: float = 0.5,
    dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> list[tuple[float, list[float]]]:
    """Steps 2-3 for a batch of descriptions.

    Args:
        text_boxes: written boxes per description (image pixels, text order).
        box_targets: per description, per written box, its phrase's targets ``G_k`` (:func:`phrase_targets`).
        iou_threshold: a box scores 0 below this IoU with its best target (``>=`` keeps).
        dedup_iou_threshold: a written box repeating an earlier one of its description above this IoU scores 0.

    Returns:
        ``(S_loc, [s_1 .. s_K])`` per description.
    """
    if len(text_boxes) != len(box_targets):
        raise ValueError(f"need targets for every description, got {len(text_boxes)} and {len(box_targets)}")
    for d, (boxes, targets) in enumerate(zip(text_boxes, box_targets)):
        if len(boxes) != len(targets):
            raise ValueError(f"description {d}: {len(boxes)} written boxes but {len(targets)} target sets")
    if not text_boxes:
        return []
    written, written_len = pad_box_sets(text_boxes, device)
    fresh = dedup_boxes(written, written_len, iou_threshold=dedup_iou_threshold, backend=backend).cpu()
    flat_boxes = [[box] for boxes in text_boxes for box in boxes]
    flat_targets = [t for targets in box_targets for t in targets]
    per_box: list[float] = []
    if flat_boxes:
        box_t, box_len = pad_box_sets(flat_boxes, device)
        target_t, target_len = pad_box_sets(flat_targets, device)
        per_box = localization_score(box_t, target_t, box_len, target_len, threshold=iou_threshold,
                                     backend=backend).cpu().tolist()  # fmt: skip
    out, start = [], 0
    for d, boxes in enumerate(text_boxes):
        scores = [per_box[start + k] if bool(fresh[d, k]) else 0.0 for k in range(len(boxes))]
        start += len(boxes)
        out.append((sum(scores) / len(scores) if scores else 0.0, scores))
    return out


# ------------------------------------------------------------------------------------ plain-Python reference
def phrase_targets_reference(ground: BoxSet, anno: BoxSet, snap_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD
                             ) -> list[Box]:  # fmt: skip
    """Step 1 for one phrase, line by line (for tests)."""
    snapped = []
    for g in ground:
        best = max(anno, key=lambda a: _iou(g, a), default=None)
        snapped.append(_as_box(best) if best is not None and _iou(g, best) > snap_iou_threshold else _as_box(g))
    return _dedup(snapped, snap_iou_threshold)


def phrase_localization_score_reference(
    text_boxes: BoxSet,
    box_targets: Sequence[BoxSet],
    *,
    iou_threshold: float = 0.5,
    dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
) -> float:
    """Steps 2-3 for one description, line by line (for tests)."""
    scores, seen = [], []
    for box, targets in zip(text_boxes, box_targets):
        repeat = any(_iou(s, box) > dedup_iou_threshold for s in seen)
        if not repeat:
            seen.append(box)
        best = max((_iou(box, t) for t in targets), default=0.0)
        scores.append(0.0 if repeat or best < iou_threshold else best)
    return sum(scores) / len(scores) if scores else 0.0

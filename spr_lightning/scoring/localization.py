"""Localization score of SPR (§3.2, Algorithm 1), batched over every candidate description of a batch.

For one description ``T`` of a queried region:

1. ``B_text``: the boxes written in ``T`` (decoded by the coordinate codec, image pixels); ``T_plain`` the text
   with them removed.
2. ``B_ground``: Grounding DINO's boxes for ``T_plain`` on the cropped region, mapped back to image pixels.
3. ``B_gt = dedup(B_anno ++ B_ground)``: annotations first, so when the detector re-finds an annotated object
   the human box survives and the detector's copy is dropped.
4. ``B_pred = dedup(B_text ++ B_ground)``: the description's own boxes first, so when the detector finds the
   object a box was written for, the *written* box is what gets scored; with the detector's copy first an
   imprecise written box would be hidden behind the detector's box and score as well as a precise one.
5-7. ``m = IoU(B_gt, B_pred)``, ``p = m if m >= 0.5 else 0``, ``S_loc = mean_i max_j p[i, j]``.

``dedup`` is greedy and order preserving (:func:`kernels.dedup_boxes`): a box is dropped when its IoU with an
earlier kept box is ``> dedup_iou_threshold``. The default 0.7 is above the 0.5 matching threshold, so
distinct neighbouring objects (which rarely overlap that much) are not merged in ``B_gt``, while a written box
and the detector's box of the same object usually are merged in ``B_pred``. Both box sets of the whole batch
are padded into ``[B, N, 4]`` tensors with lengths, so steps 3-7 are three kernel launches per batch, not a
Python loop per description (the Triton kernels on CUDA, their torch twins elsewhere).

Conventions (kernels): an empty ``B_gt`` scores 0 (nothing to find; all candidates of such a query tie), an
empty ``B_pred`` scores 0. :func:`localization_score_reference` is a plain-Python transcription of the same
steps for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import dedup_boxes, localization_score

__all__ = [
    "DEFAULT_DEDUP_IOU_THRESHOLD",
    "LocalizationResult",
    "localization_score_reference",
    "localization_scores",
    "merge_dedup",
    "pad_box_sets",
]

Box = tuple[float, float, float, float]
BoxSet = Sequence[Sequence[float]]

#: Greedy de-duplication threshold of Algorithm 1 steps 3-4 (the paper gives none; see the module docstring).
DEFAULT_DEDUP_IOU_THRESHOLD = 0.7


@dataclass(frozen=True)
class LocalizationResult:
    """Algorithm 1 for one description: the score and the box sets behind it (refinement reuses ``B_gt``).

    Attributes:
        score: ``S_loc`` in ``[0, 1]``.
        gt_boxes: ``B_gt`` after de-duplication, annotations first, then detector boxes.
        gt_sources: ``"anno"`` or ``"ground"`` for each box of ``gt_boxes``.
        pred_boxes: ``B_pred`` after de-duplication, written boxes first, then detector boxes.
        pred_sources: ``"text"`` or ``"ground"`` for each box of ``pred_boxes``.
    """

    score: float
    gt_boxes: list[Box]
    gt_sources: list[str]
    pred_boxes: list[Box]
    pred_sources: list[str]


def pad_box_sets(sets: Sequence[BoxSet], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack variable-size box sets into ``([B, N, 4] float32, lengths [B] int64)``, zero padded.

    ``N`` is the largest set (at least 1, so that every kernel sees a real box dimension).
    """
    lengths = [len(s) for s in sets]
    boxes = torch.zeros((len(sets), max(lengths, default=0) or 1, 4), dtype=torch.float32)
    for b, box_set in enumerate(sets):
        if box_set:
            boxes[b, : len(box_set)] = torch.as_tensor([list(map(float, box)) for box in box_set])
    return boxes.to(device), torch.tensor(lengths, dtype=torch.int64, device=device)


def merge_dedup(
    first: Sequence[BoxSet],
    second: Sequence[BoxSet],
    *,
    iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> tuple[list[list[Box]], list[list[int]]]:
    """``dedup(first[b] ++ second[b])`` for every ``b`` at once (Algorithm 1 steps 3 and 4).

    Returns:
        ``(boxes, origins)``: per set, the kept boxes in order and for each whether it came from ``first``
        (0) or ``second`` (1).
    """
    if len(first) != len(second):
        raise ValueError(f"merge_dedup needs as many first sets as second sets, got {len(first)} and {len(second)}")
    joined = [list(a) + list(b) for a, b in zip(first, second)]
    if not joined:
        return [], []
    boxes, lengths = pad_box_sets(joined, device)
    keep = dedup_boxes(boxes, lengths, iou_threshold=iou_threshold, backend=backend).cpu()
    kept_boxes: list[list[Box]] = []
    origins: list[list[int]] = []
    for b, box_set in enumerate(joined):
        idx = keep[b, : len(box_set)].nonzero().flatten().tolist()
        kept_boxes.append([_as_box(box_set[i]) for i in idx])
        origins.append([0 if i < len(first[b]) else 1 for i in idx])
    return kept_boxes, origins


def localization_scores(
    text_boxes: Sequence[BoxSet],
    ground_boxes: Sequence[BoxSet],
    anno_boxes: Sequence[BoxSet],
    *,
    iou_threshold: float = 0.5,
    dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    device: torch.device | str | None = None,
    backend: str = "auto",
    ground_in_pred: bool = True,
) -> list[LocalizationResult]:
    """Algorithm 1 for a batch of descriptions (steps 3-7; steps 1-2 are the codec and the grounder).

    Args:
        text_boxes: ``B_text`` per description (image pixels, ``xyxy``, text order).
        ground_boxes: ``B_ground`` per description (image pixels); empty sets when no grounder is used.
        anno_boxes: ``B_anno`` per description: the region's annotated boxes (repeat them for each candidate
            of one region).
        iou_threshold: the IoU filter of step 6 (paper: 0.5; ``>=`` keeps).
        dedup_iou_threshold: greedy de-duplication threshold of steps 3-4 (``>`` drops).
        device: where the kernels run (CUDA: Triton kernels under ``backend="auto"``).
        backend: kernel backend, see :mod:`kernels`.
        ground_in_pred: step 4 as in the paper, ``B_pred = dedup(B_text ++ B_ground)``. ``False``: the
            detector's boxes count as ground truth only, ``B_pred = dedup(B_text)`` (not the paper's; see
            ``docs/scoring.md``: with the detector on both sides a written box scores only on objects the
            detector missed).

    Returns:
        One :class:`LocalizationResult` per description, in order.
    """
    if not len(text_boxes) == len(ground_boxes) == len(anno_boxes):
        raise ValueError(
            f"need one text, ground and annotation set per description, got {len(text_boxes)}, "
            f"{len(ground_boxes)} and {len(anno_boxes)}"
        )
    if not text_boxes:
        return []
    common = {"iou_threshold": dedup_iou_threshold, "device": device, "backend": backend}
    gt, gt_origin = merge_dedup(anno_boxes, ground_boxes, **common)
    pred_extra = ground_boxes if ground_in_pred else [[] for _ in text_boxes]
    pred, pred_origin = merge_dedup(text_boxes, pred_extra, **common)
    gt_t, gt_len = pad_box_sets(gt, device)
    pred_t, pred_len = pad_box_sets(pred, device)
    scores = localization_score(gt_t, pred_t, gt_len, pred_len, threshold=iou_threshold, backend=backend)
    return [
        LocalizationResult(
            score=float(score),
            gt_boxes=gt[b],
            gt_sources=["anno" if o == 0 else "ground" for o in gt_origin[b]],
            pred_boxes=pred[b],
            pred_sources=["text" if o == 0 else "ground" for o in pred_origin[b]],
        )
        for b, score in enumerate(scores.cpu().tolist())
    ]


# ------------------------------------------------------------------------------------ plain-Python reference
def _as_box(box: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2, y2)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``xyxy`` boxes; 0 when the union is empty (degenerate boxes), as in :mod:`kernels`."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _dedup(boxes: Sequence[Sequence[float]], threshold: float) -> list[Box]:
    kept: list[Box] = []
    for box in boxes:
        if all(_iou(k, box) <= threshold for k in kept):
            kept.append(_as_box(box))
    return kept


def localization_score_reference(
    text_boxes: BoxSet,
    ground_boxes: BoxSet,
    anno_boxes: BoxSet,
    *,
    iou_threshold: float = 0.5,
    dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    ground_in_pred: bool = True,
) -> float:
    """Algorithm 1 steps 3-7 for one description, written out line by line in plain Python (for tests)."""
    b_gt = _dedup(list(anno_boxes) + list(ground_boxes), dedup_iou_threshold)  # step 3
    pred_extra = list(ground_boxes) if ground_in_pred else []  # ground_in_pred=False: B_pred = dedup(B_text)
    b_pred = _dedup(list(text_boxes) + pred_extra, dedup_iou_threshold)  # step 4
    if not b_gt:
        return 0.0
    m = [[_iou(g, p) for p in b_pred] for g in b_gt]  # step 5
    p = [[0.0 if v < iou_threshold else v for v in row] for row in m]  # step 6
    return sum(max(row, default=0.0) for row in p) / len(b_gt)  # step 7

"""Referring-expression accuracy: the fraction of expressions whose one predicted box reaches an IoU threshold.

Conventions differ between papers only in the comparison: Ferret, Qwen-VL and lmms-eval count IoU >= 0.5
(``inclusive=True``), Shikra and MiniGPT-v2 count IoU > 0.5 (``inclusive=False``). Every sample counts in the
denominator, including those whose answer held no readable box (a NaN row), which are misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from kernels import batched_box_iou

__all__ = ["AccuracyAtIoU", "accuracy_at_iou", "paired_iou"]


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of row ``i`` of ``boxes1[N, 4]`` with row ``i`` of ``boxes2[N, 4]`` -> ``[N]`` (kernels' numbers policy:
    0, not NaN, for a zero union; callers mask non-finite rows themselves)."""
    return batched_box_iou(boxes1[:, None, :], boxes2[:, None, :], check_nan=False)[:, 0, 0]


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"IoU thresholds must be a non-empty sequence in (0, 1], got {thresholds!r}")
    return values


def _as_boxes(boxes: Tensor, name: str) -> Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [N, 4] xyxy boxes, got shape {tuple(boxes.shape)}")
    return boxes.float()


def _accuracy_at_iou_update(
    preds: Tensor, target: Tensor, thresholds: tuple[float, ...], inclusive: bool
) -> tuple[Tensor, Tensor]:
    """Hits per threshold ``[T]`` and the number of samples of one batch."""
    preds, target = _as_boxes(preds, "preds"), _as_boxes(target, "target")
    if preds.shape != target.shape:
        shapes = f"{tuple(preds.shape)} and {tuple(target.shape)}"
        raise ValueError(f"preds and target must have the same shape, got {shapes}")
    readable = torch.isfinite(preds).all(dim=-1)
    iou = paired_iou(torch.where(readable[:, None], preds, torch.zeros_like(preds)), target)
    thr = torch.tensor(thresholds, device=iou.device)
    hit = (iou[:, None] >= thr) if inclusive else (iou[:, None] > thr)
    hit &= readable[:, None]
    return hit.sum(dim=0), torch.tensor(preds.shape[0], device=iou.device)


def _accuracy_at_iou_compute(hits: Tensor, total: Tensor, thresholds: tuple[float, ...]) -> dict[str, Tensor]:
    """``{"acc@0.5": fraction, ...}``; 0 for every threshold when nothing was seen."""
    frac = hits.double() / total.clamp(min=1).double()
    return {f"acc@{t:g}": frac[i].float() for i, t in enumerate(thresholds)}


def accuracy_at_iou(
    preds: Tensor,
    target: Tensor,
    thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
    inclusive: bool = True,
) -> dict[str, Tensor]:
    """Functional :class:`AccuracyAtIoU` on one batch (same arguments and keys)."""
    thr = _check_thresholds(thresholds)
    hits, total = _accuracy_at_iou_update(preds, target, thr, inclusive)
    return _accuracy_at_iou_compute(hits, total, thr)


class AccuracyAtIoU(Metric):
    """Accuracy@IoU for referring expression comprehension (RefCOCO/+/g), DDP-synced by summing counts.

    Args:
        thresholds: IoU thresholds; one output key ``"acc@<t>"`` each.
        inclusive: count IoU >= t (Ferret, Qwen-VL, lmms-eval) when True, IoU > t (Shikra, MiniGPT-v2) when
            False.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``dist_sync_fn``...).

    Example:
        >>> m = AccuracyAtIoU(thresholds=(0.5,))
        >>> m.update(torch.tensor([[0., 0, 2, 1], [float("nan")] * 4]), torch.tensor([[0., 0, 1, 1]] * 2))
        >>> m.compute()
        {'acc@0.5': tensor(0.5000)}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: Tensor
    total: Tensor

    def __init__(
        self, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), inclusive: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.thresholds = _check_thresholds(thresholds)
        self.inclusive = inclusive
        self.add_state("hits", torch.zeros(len(self.thresholds), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            preds: ``[N, 4]`` predicted pixel xyxy boxes; a row with a NaN means no box could be read (a miss).
            target: ``[N, 4]`` ground-truth pixel xyxy boxes.
        """
        hits, total = _accuracy_at_iou_update(preds, target, self.thresholds, self.inclusive)
        self.hits += hits.to(self.hits.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, Tensor]:
        """Fractions in [0, 1] per threshold, keyed ``"acc@0.5"``, ``"acc@0.6"``, ..."""
        return _accuracy_at_iou_compute(self.hits, self.total, self.thresholds)

"""Grounded region description refinement (SPR §3.2, last paragraph, and appendix §1).

The preferred (highest-scoring) description is rewritten so that its boxes are exact, which widens the gap
between the grounding of the chosen and the rejected answer; the rejected one is left as generated. For each
box written in the description, in text order:

* **inside the queried region** (at least ``inside_threshold`` = 50% of its area inside ``region``, the rule the
  appendix uses for object indices): matched to its best ground truth ``B_gt`` (Algorithm 1's annotations plus
  detector boxes). IoU ``> 0.5``: the box is *snapped* to that ground truth; otherwise it is removed.
* **outside the region**: ``B_gt`` only covers the region (the detector only saw the crop), so the box is
  checked against the annotations ``B_anno`` instead and, per the appendix ("retain the coordinates of
  objects outside the region ... provided their IoU with the object annotations exceeds 0.5"), *kept as
  written* when it matches (or snapped, with ``snap_outside=True``), removed otherwise.
* **duplicates by text position**: a later box snapped to a ground truth an earlier box already took is
  removed, and so is any later box whose IoU with an earlier kept box is ``> dedup_iou_threshold``.

The new boxes go back into the text with :meth:`Codec.replace`, which rewrites only the box groups (a box set to
``None`` disappears with its joiner); all other characters stay as generated. Detector boxes that match no
written box are not inserted: they have no place in the text, and inventing phrases is not refinement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import dedup_boxes, match_boxes
from spr_lightning.coords import Codec
from spr_lightning.regions.geometry import inside_fraction
from spr_lightning.scoring.localization import DEFAULT_DEDUP_IOU_THRESHOLD, Box, BoxSet

__all__ = ["RefineResult", "refine_description"]


@dataclass(frozen=True)
class RefineResult:
    """A refined description and what happened to each of its boxes.

    Attributes:
        text: the refined description (equal to the input when it has no boxes or nothing changed).
        boxes: one entry per box decoded from the input, in text order: its new pixel box, or ``None`` when
            removed.
        snapped: boxes replaced by their matched ground truth.
        kept: boxes kept as written: outside the region and matching an annotation (``snap_outside=False``), or
            matching nothing with ``keep_unmatched=True``.
        unmatched: boxes removed because no ground truth overlaps them by more than the match threshold.
        duplicates: boxes removed as a repeat of an earlier box.
    """

    text: str
    boxes: list[Box | None]
    snapped: int
    kept: int
    unmatched: int
    duplicates: int

    def stats(self) -> dict[str, int]:
        """Counts for the pair record and the run summary."""
        return {"snapped": self.snapped, "kept": self.kept, "unmatched": self.unmatched, "duplicates": self.duplicates}


def _tensor(boxes: BoxSet) -> torch.Tensor:
    return torch.as_tensor([list(map(float, b)) for b in boxes], dtype=torch.float32).reshape(-1, 4)


def _match(pred: torch.Tensor, gt: BoxSet, threshold: float) -> list[int]:
    """Best ground-truth index per prediction (``-1``: none above ``threshold``); torch backend: tiny sets."""
    if not gt or pred.shape[0] == 0:
        return [-1] * pred.shape[0]
    index, _ = match_boxes(pred, _tensor(gt), threshold=threshold, backend="torch")
    return index.tolist()


def refine_description(
    text: str,
    codec: Codec,
    image_size: tuple[int, int],
    gt_boxes: BoxSet,
    *,
    anno_boxes: BoxSet | None = None,
    region: Sequence[float] | None = None,
    match_iou_threshold: float = 0.5,
    dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
    inside_threshold: float = 0.5,
    snap_outside: bool = False,
    keep_unmatched: bool = False,
) -> RefineResult:
    """Snap, filter and de-duplicate the boxes of one description; see the module docstring for the rules.

    Args:
        text: the description, boxes written in ``codec``'s format (full-image coordinates).
        codec: the coordinate codec of ``text``.
        image_size: ``(W, H)`` of the image.
        gt_boxes: ``B_gt`` of Algorithm 1 for this description (:attr:`LocalizationResult.gt_boxes`).
        anno_boxes: the annotations, for boxes outside the region (``None``: such boxes are removed).
        region: the queried region ``xyxy``; ``None`` treats every box as inside it.
        match_iou_threshold: a box matches a ground truth when their IoU is ``> match_iou_threshold`` (0.5).
        dedup_iou_threshold: a later box with IoU ``>`` this against an earlier kept box is removed.
        inside_threshold: fraction of a box's area inside ``region`` that makes it "inside".
        snap_outside: snap matched boxes outside the region to their annotation instead of keeping them.
        keep_unmatched: keep boxes that match nothing as written (counted as ``kept``) instead of removing them. Not
            the paper's rule: with a weak policy most written boxes match nothing, removing them makes the chosen
            answer the one with fewer boxes, and DPO learns to write fewer boxes (``docs/quickstart.md``).

    Returns:
        The :class:`RefineResult`.
    """
    groundings = codec.decode(text, image_size)
    if not groundings:
        return RefineResult(text, [], 0, 0, 0, 0)
    pred = _tensor([g.xyxy for g in groundings])
    inside = [True] * len(groundings)
    if region is not None:
        inside = (inside_fraction(pred, region) >= inside_threshold).tolist()
    gt_index = _match(pred, gt_boxes, match_iou_threshold)
    anno_index = _match(pred, anno_boxes or [], match_iou_threshold)

    new: list[Box | None] = []
    kinds: list[str] = []  # "snapped", "kept", "unmatched" or "duplicate", per box
    used: set[tuple[str, int]] = set()
    for i, grounding in enumerate(groundings):
        box: Box | None = None
        target: tuple[str, int] | None = None
        if inside[i] and gt_index[i] >= 0:
            target, box = ("gt", gt_index[i]), _box(gt_boxes[gt_index[i]])
        elif not inside[i] and anno_index[i] >= 0:
            target = ("anno", anno_index[i])
            box = _box(anno_boxes[anno_index[i]]) if snap_outside else grounding.xyxy  # type: ignore[index]
        if target is None:
            new.append(grounding.xyxy if keep_unmatched else None)
            kinds.append("kept" if keep_unmatched else "unmatched")
        elif target in used:  # the same object again, later in the text
            new.append(None)
            kinds.append("duplicate")
        else:
            used.add(target)
            new.append(box)
            kinds.append("snapped" if target[0] == "gt" or snap_outside else "kept")
    for i in _overlapping(new, dedup_iou_threshold):
        new[i] = None
        kinds[i] = "duplicate"
    return RefineResult(
        text=codec.replace(text, new, image_size),
        boxes=new,
        snapped=kinds.count("snapped"),
        kept=kinds.count("kept"),
        unmatched=kinds.count("unmatched"),
        duplicates=kinds.count("duplicate"),
    )


def _box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def _overlapping(boxes: Sequence[Box | None], iou_threshold: float) -> list[int]:
    """Indices of boxes whose IoU with an earlier kept (non-``None``) box is ``> iou_threshold``."""
    alive = [i for i, b in enumerate(boxes) if b is not None]
    if len(alive) < 2:
        return []
    keep = dedup_boxes(_tensor([boxes[i] for i in alive]), iou_threshold=iou_threshold, backend="torch").tolist()
    return [i for i, k in zip(alive, keep) if not k]

"""Grounding metrics as torchmetrics ``Metric`` classes (DDP-synced count states) with functional twins.

* :class:`AccuracyAtIoU` / :func:`accuracy_at_iou`: referring expression comprehension (RefCOCO/+/g).
* :class:`PhraseGroundingRecall` / :func:`phrase_grounding_recall`: Flickr30k Entities Recall@k.

IoU comes from :mod:`kernels` (Triton on CUDA, torch elsewhere).
"""

from spr_lightning.metrics.accuracy import AccuracyAtIoU, accuracy_at_iou
from spr_lightning.metrics.captions import CaptionScores
from spr_lightning.metrics.phrase_recall import PhraseGroundingRecall, phrase_grounding_recall
from spr_lightning.metrics.pope import POPEMetrics

__all__ = [
    "AccuracyAtIoU",
    "CaptionScores",
    "POPEMetrics",
    "PhraseGroundingRecall",
    "accuracy_at_iou",
    "phrase_grounding_recall",
]

"""Box kernels for SPR's localization score and refinement: IoU matrices, thresholding, the fused
localization score (Algorithm 1 steps 5-7), greedy de-duplication and matching.

Every op takes ``xyxy`` float boxes, computes in float32, accepts a ``backend`` of ``"auto"`` (Triton on
CUDA tensors, torch otherwise), ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before import)
or ``"torch"`` (vectorised, runs anywhere), and is inference only. The numbers policy (torchvision parity,
degenerate boxes give 0 not NaN, NaN inputs raise) is in :mod:`kernels.box_iou`. Note: this top-level
package shadows the unrelated PyPI package also named ``kernels``.
"""

from kernels.box_iou import batched_box_iou, box_iou
from kernels.dedup import dedup_boxes
from kernels.localization_score import localization_score
from kernels.match import match_boxes
from kernels.threshold import threshold_iou

__all__ = ["batched_box_iou", "box_iou", "dedup_boxes", "localization_score", "match_boxes", "threshold_iou"]

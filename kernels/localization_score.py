"""Fused localization score (Algorithm 1 steps 5-7) per set of ground-truth and predicted boxes.

``S_loc = (1/n) * sum_i max_j p[i, j]`` with ``p = threshold(IoU(B_gt, B_pred))`` (``>=`` keeps). The
threshold is monotone, so ``max_j p[i, j] == threshold(max_j IoU[i, j])`` exactly (if the largest IoU is
kept it is the largest kept value; if not, every entry is zeroed): both backends threshold the ``N`` row
maxima instead of the ``N x M`` matrix, which is one fewer full pass. The Triton kernel runs one program
per set that loops over ground-truth and prediction tiles, keeping only running row maxima in registers:
the ``[B, N, M]`` IoU matrix is never written to memory. The torch reference materialises it (vectorised
over the batch). Conventions: an empty ground-truth set scores 0 (no objects to find, nothing to reward)
and an empty prediction set scores 0 (every row max is 0). Numbers policy (fp32 compute, degenerate
boxes, NaN checks): see :mod:`kernels.box_iou`. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import _checks, _guards
from kernels._checks import LengthsLike
from kernels.box_iou import batched_box_iou_torch, block_size
from kernels.threshold import keep_at_least_

__all__ = ["localization_score", "localization_score_torch"]


@torch.no_grad()
def localization_score_torch(
    gt_boxes: Tensor, pred_boxes: Tensor, gt_lengths: Tensor, pred_lengths: Tensor, threshold: float = 0.5
) -> Tensor:
    """Torch reference: ``[B, N, 4] x [B, M, 4] -> [B]`` float32, through the full IoU matrix."""
    batch, n, m = gt_boxes.shape[0], gt_boxes.shape[1], pred_boxes.shape[1]
    if n == 0 or m == 0:
        return torch.zeros(batch, dtype=torch.float32, device=gt_boxes.device)
    iou = batched_box_iou_torch(gt_boxes, pred_boxes, gt_lengths, pred_lengths, scratch_output=True)  # padding: 0
    row_max = keep_at_least_(iou.amax(dim=2), threshold)  # threshold after the max: see module docstring
    return row_max.sum(dim=1) / gt_lengths.clamp(min=1).to(torch.float32)  # padded gt rows add 0


if _guards.HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.box_iou import _load_boxes, _pair_iou

    @triton.jit
    def _localization_score_kernel(
        gt_ptr, pred_ptr, len_gt_ptr, len_pred_ptr, out_ptr, threshold,
        stride_gb, stride_gn, stride_gc,
        stride_pb, stride_pm, stride_pc,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """One program per set: IoU tile -> running row max -> threshold -> masked mean, all in registers."""
        batch = tl.program_id(0).to(tl.int64)
        n_len = tl.load(len_gt_ptr + batch)
        m_len = tl.load(len_pred_ptr + batch)
        gt_base = gt_ptr + batch * stride_gb
        pred_base = pred_ptr + batch * stride_pb
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(0, n_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid_n = offs_n < n_len
            gx1, gy1, gx2, gy2 = _load_boxes(gt_base, offs_n, valid_n, stride_gn, stride_gc)
            row_max = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for m0 in range(0, m_len, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                valid_m = offs_m < m_len
                px1, py1, px2, py2 = _load_boxes(pred_base, offs_m, valid_m, stride_pm, stride_pc)
                iou = _pair_iou(
                    gx1[:, None], gy1[:, None], gx2[:, None], gy2[:, None],
                    px1[None, :], py1[None, :], px2[None, :], py2[None, :],
                )  # fmt: skip
                row_max = tl.maximum(row_max, tl.max(tl.where(valid_m[None, :], iou, 0.0), axis=1))
            total += tl.where(valid_n & (row_max >= threshold), row_max, 0.0)
        score = tl.sum(total, axis=0) / tl.maximum(n_len, 1).to(tl.float32)
        tl.store(out_ptr + batch, score)


def _localization_score_triton(
    gt_boxes: Tensor, pred_boxes: Tensor, gt_lengths: Tensor, pred_lengths: Tensor, threshold: float
) -> Tensor:
    """Launch :func:`_localization_score_kernel`, one program per set."""
    batch = gt_boxes.shape[0]
    out = torch.empty(batch, dtype=torch.float32, device=gt_boxes.device)
    if batch == 0:
        return out
    _localization_score_kernel[(batch,)](
        gt_boxes, pred_boxes, gt_lengths.to(torch.int32), pred_lengths.to(torch.int32), out, threshold,
        *gt_boxes.stride(), *pred_boxes.stride(),
        BLOCK_N=block_size(gt_boxes.shape[1], 32), BLOCK_M=block_size(pred_boxes.shape[1], 32),
    )  # fmt: skip
    return out


def localization_score(
    gt_boxes: Tensor,
    pred_boxes: Tensor,
    gt_lengths: LengthsLike = None,
    pred_lengths: LengthsLike = None,
    *,
    threshold: float = 0.5,
    backend: str = "auto",
    check_nan: bool = True,
) -> Tensor:
    """Algorithm 1 steps 5-7: mean over ground-truth boxes of their best thresholded IoU with a prediction.

    Args:
        gt_boxes: ``[B, N, 4]`` ground-truth ``xyxy`` boxes (or one ``[N, 4]`` set).
        pred_boxes: ``[B, M, 4]`` predicted ``xyxy`` boxes (or one ``[M, 4]`` set), same device.
        gt_lengths: ``[B]`` real ground-truth boxes per set (``None``: all ``N``).
        pred_lengths: ``[B]`` real predictions per set (``None``: all ``M``).
        threshold: IoUs below it count as 0 (the paper uses 0.5; ``>=`` keeps).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        check_nan: raise ``ValueError`` naming the batch index if a real box holds NaN/inf.

    Returns:
        ``[B]`` float32 scores in ``[0, 1]`` (a 0-dim tensor for unbatched input); 0 for sets with no
        ground truth or no predictions.
    """
    gt, pred, unbatched = _checks.as_batched_pair(gt_boxes, "gt_boxes", pred_boxes, "pred_boxes")
    threshold = _checks.check_threshold(threshold, "threshold")
    gt_len = _checks.check_lengths(gt_lengths, gt.shape[0], gt.shape[1], "gt_lengths", gt.device)
    pred_len = _checks.check_lengths(pred_lengths, pred.shape[0], pred.shape[1], "pred_lengths", pred.device)
    if check_nan:
        _checks.check_finite(gt, gt_len, "gt_boxes")
        _checks.check_finite(pred, pred_len, "pred_boxes")
    if _checks.resolve_backend(backend, gt.device) == "triton":
        scores = _localization_score_triton(gt, pred, gt_len, pred_len, threshold)
    else:
        scores = localization_score_torch(gt, pred, gt_len, pred_len, threshold)
    return scores[0] if unbatched else scores

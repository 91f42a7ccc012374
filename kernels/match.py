"""Best ground truth per prediction (used by grounded-description refinement, paper Sec. 3.2).

Refinement keeps only predictions whose best ground-truth IoU is ``> threshold`` (0.5 in the paper) and
replaces their boxes with the matched ground truth. ``gt_index`` is ``-1`` where the best IoU is
``<= threshold``, for padded predictions and when a set has no ground truth. Ties go to the lowest
ground-truth index (first maximum), on both backends. ``iou`` is the best IoU whether or not it passes
the threshold (0 for padded predictions and empty ground-truth sets), so callers can log near misses.
The Triton kernel fuses IoU and the running arg-max, never writing the ``[B, M, N]`` matrix.
Numbers policy: see :mod:`kernels.box_iou`. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import _checks, _guards
from kernels._checks import LengthsLike
from kernels.box_iou import block_size, pair_iou_torch, valid_mask, zero_padding

__all__ = ["match_boxes", "match_boxes_torch"]


@torch.no_grad()
def match_boxes_torch(
    pred: Tensor, gt: Tensor, pred_lengths: Tensor, gt_lengths: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Torch reference: ``[B, M, 4] x [B, N, 4] -> (gt_index [B, M] int64, iou [B, M] float32)``."""
    batch, m, n = pred.shape[0], pred.shape[1], gt.shape[1]
    if n == 0:
        index = torch.full((batch, m), -1, dtype=torch.int64, device=pred.device)
        return index, torch.zeros((batch, m), dtype=torch.float32, device=pred.device)
    iou = pair_iou_torch(pred, zero_padding(gt, gt_lengths), scratch_output=True)  # reduced right below
    # Padded ground truth gets -1 so it can never win, not even against real IoUs of 0.
    iou.masked_fill_(~valid_mask(gt_lengths, n)[:, None, :], -1.0)
    best, index = iou.max(dim=2)  # torch.max returns the first maximal index on ties
    pred_ok = valid_mask(pred_lengths, m) & (best >= 0)
    index = torch.where(pred_ok & (best > threshold), index, torch.full_like(index, -1))
    best = torch.where(pred_ok, best, torch.zeros_like(best))
    return index, best


if _guards.HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.box_iou import _load_boxes, _pair_iou

    @triton.jit
    def _match_kernel(
        pred_ptr, gt_ptr, len_pred_ptr, len_gt_ptr, index_ptr, iou_ptr, threshold, M,
        stride_pb, stride_pm, stride_pc,
        stride_gb, stride_gn, stride_gc,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per (set, prediction tile): loop over ground-truth tiles keeping a running arg-max."""
        batch = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_len = tl.load(len_pred_ptr + batch)
        n_len = tl.load(len_gt_ptr + batch)
        valid_m = offs_m < m_len
        px1, py1, px2, py2 = _load_boxes(pred_ptr + batch * stride_pb, offs_m, valid_m, stride_pm, stride_pc)
        best = tl.full((BLOCK_M,), -1.0, dtype=tl.float32)
        best_index = tl.full((BLOCK_M,), -1, dtype=tl.int32)
        for n0 in range(0, n_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid_n = offs_n < n_len
            gx1, gy1, gx2, gy2 = _load_boxes(gt_ptr + batch * stride_gb, offs_n, valid_n, stride_gn, stride_gc)
            iou = _pair_iou(
                px1[:, None], py1[:, None], px2[:, None], py2[:, None],
                gx1[None, :], gy1[None, :], gx2[None, :], gy2[None, :],
            )  # fmt: skip
            iou = tl.where(valid_n[None, :], iou, -1.0)
            tile_best, tile_arg = tl.max(iou, axis=1, return_indices=True, return_indices_tie_break_left=True)
            # Strictly greater: an equal IoU in a later tile must not displace the earlier (lower) index.
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_index = tl.where(better, tile_arg.to(tl.int32) + n0, best_index)
        ok = valid_m & (best >= 0.0)
        index = tl.where(ok & (best > threshold), best_index, -1)
        store_mask = offs_m < M
        tl.store(index_ptr + batch * M + offs_m, index.to(tl.int64), mask=store_mask)
        tl.store(iou_ptr + batch * M + offs_m, tl.where(ok, best, 0.0), mask=store_mask)


def _match_boxes_triton(
    pred: Tensor, gt: Tensor, pred_lengths: Tensor, gt_lengths: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Launch :func:`_match_kernel` over (set, prediction tile)."""
    batch, m = pred.shape[0], pred.shape[1]
    index = torch.empty((batch, m), dtype=torch.int64, device=pred.device)
    iou = torch.empty((batch, m), dtype=torch.float32, device=pred.device)
    if index.numel() == 0:
        return index, iou
    block_m = block_size(m, 64)
    _match_kernel[(batch, triton.cdiv(m, block_m))](
        pred, gt, pred_lengths.to(torch.int32), gt_lengths.to(torch.int32), index, iou, threshold, m,
        *pred.stride(), *gt.stride(),
        BLOCK_M=block_m, BLOCK_N=block_size(gt.shape[1], 32),
    )  # fmt: skip
    return index, iou


def match_boxes(
    pred: Tensor,
    gt: Tensor,
    pred_lengths: LengthsLike = None,
    gt_lengths: LengthsLike = None,
    *,
    threshold: float = 0.5,
    backend: str = "auto",
    check_nan: bool = True,
) -> tuple[Tensor, Tensor]:
    """Match every prediction to its best-overlapping ground-truth box.

    Args:
        pred: ``[B, M, 4]`` predicted ``xyxy`` boxes (or one ``[M, 4]`` set).
        gt: ``[B, N, 4]`` ground-truth ``xyxy`` boxes (or one ``[N, 4]`` set), same device.
        pred_lengths: ``[B]`` real predictions per set (``None``: all ``M``).
        gt_lengths: ``[B]`` real ground-truth boxes per set (``None``: all ``N``).
        threshold: a match needs IoU strictly above it (refinement keeps IoU > 0.5).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        check_nan: raise ``ValueError`` naming the batch index if a real box holds NaN/inf.

    Returns:
        ``(gt_index, iou)``: ``[B, M]`` int64 index into ``gt`` (``-1`` = unmatched) and ``[B, M]`` float32
        best IoU (``[M]`` each for unbatched input).
    """
    p, g, unbatched = _checks.as_batched_pair(pred, "pred", gt, "gt")
    threshold = _checks.check_threshold(threshold, "threshold")
    p_len = _checks.check_lengths(pred_lengths, p.shape[0], p.shape[1], "pred_lengths", p.device)
    g_len = _checks.check_lengths(gt_lengths, g.shape[0], g.shape[1], "gt_lengths", g.device)
    if check_nan:
        _checks.check_finite(p, p_len, "pred")
        _checks.check_finite(g, g_len, "gt")
    if _checks.resolve_backend(backend, p.device) == "triton":
        index, iou = _match_boxes_triton(p, g, p_len, g_len, threshold)
    else:
        index, iou = match_boxes_torch(p, g, p_len, g_len, threshold)
    return (index[0], iou[0]) if unbatched else (index, iou)

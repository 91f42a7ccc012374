"""Greedy IoU de-duplication of boxes in their given order (Algorithm 1 steps 3-4, refinement).

Box ``i`` is kept unless it overlaps an *earlier kept* box with IoU ``> iou_threshold`` (the NMS
convention of ``torchvision.ops.nms``, but without sorting by score: the order is the boxes' position in
the text, so the first mention wins). This is inherently sequential within a set, so:

* the torch path loops over box positions (``N`` steps), vectorised over the batch;
* the Triton kernel runs one program per set that walks the boxes greedily, holding the keep mask for the
  whole set in registers, which caps it at :data:`MAX_TRITON_BOXES` boxes per set (``"auto"`` falls back
  to torch above that; ``"triton"`` raises).

Zero-area boxes have IoU 0 with everything (see the numbers policy in :mod:`kernels.box_iou`), so they
are never duplicates, not even of an identical zero-area box. Boxes beyond a set's length are not kept.
Both backends compute IoU in fp32; an IoU within float rounding of the threshold may decide differently
on GPU (fused multiply-add) than on CPU. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import _checks, _guards
from kernels._checks import LengthsLike
from kernels.box_iou import block_size, pair_iou_torch, valid_mask

__all__ = ["MAX_TRITON_BOXES", "dedup_boxes", "dedup_boxes_torch"]

MAX_TRITON_BOXES = 4096


@torch.no_grad()
def dedup_boxes_torch(boxes: Tensor, lengths: Tensor, iou_threshold: float) -> Tensor:
    """Torch reference: ``[B, N, 4] -> keep [B, N]`` bool, looping over positions, not over sets."""
    n = boxes.shape[1]
    keep = valid_mask(lengths, n)
    if n < 2:
        return keep
    # Only the strictly-lower triangle matters: box i can be suppressed by earlier boxes j < i.
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).tril(diagonal=-1)
    # Padding is never kept, so it needs no mask here.
    overlaps = (pair_iou_torch(boxes, boxes, scratch_output=True) > iou_threshold) & earlier
    for i in range(1, n):
        suppressed = (overlaps[:, i, :i] & keep[:, :i]).any(dim=1)
        keep[:, i] &= ~suppressed
    return keep


if _guards.HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.box_iou import _load_boxes, _pair_iou

    @triton.jit
    def _dedup_kernel(
        boxes_ptr, len_ptr, keep_ptr, iou_threshold, N,
        stride_b, stride_n, stride_c,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per set: visit boxes in order, keep box i unless an earlier kept box overlaps it."""
        batch = tl.program_id(0).to(tl.int64)
        n_len = tl.load(len_ptr + batch)
        base = boxes_ptr + batch * stride_b
        offs = tl.arange(0, BLOCK_N)
        valid = offs < n_len
        x1, y1, x2, y2 = _load_boxes(base, offs, valid, stride_n, stride_c)
        keep = valid
        for i in range(0, n_len):
            box = base + i * stride_n
            bx1 = tl.load(box).to(tl.float32)
            by1 = tl.load(box + stride_c).to(tl.float32)
            bx2 = tl.load(box + 2 * stride_c).to(tl.float32)
            by2 = tl.load(box + 3 * stride_c).to(tl.float32)
            # Same argument order as the torch path's [i, j] entry, so both round identically.
            iou = _pair_iou(bx1, by1, bx2, by2, x1, y1, x2, y2)
            hits = (iou > iou_threshold) & keep & (offs < i)
            suppressed = tl.max(hits.to(tl.int32), axis=0) > 0
            keep = tl.where(offs == i, keep & ~suppressed, keep)
        tl.store(keep_ptr + batch * N + offs, keep.to(tl.int8), mask=offs < N)


def _dedup_boxes_triton(boxes: Tensor, lengths: Tensor, iou_threshold: float) -> Tensor:
    """Launch :func:`_dedup_kernel`, one program per set."""
    batch, n = boxes.shape[0], boxes.shape[1]
    keep = torch.empty((batch, n), dtype=torch.int8, device=boxes.device)
    if keep.numel():
        _dedup_kernel[(batch,)](
            boxes, lengths.to(torch.int32), keep, iou_threshold, n, *boxes.stride(),
            BLOCK_N=block_size(n, MAX_TRITON_BOXES),
        )  # fmt: skip
    return keep.bool()


def dedup_boxes(
    boxes: Tensor,
    lengths: LengthsLike = None,
    *,
    iou_threshold: float,
    backend: str = "auto",
    check_nan: bool = True,
) -> Tensor:
    """Keep mask of greedy, order-preserving de-duplication (earlier boxes win).

    Args:
        boxes: ``[B, N, 4]`` ``xyxy`` boxes in text order (or one ``[N, 4]`` set).
        lengths: ``[B]`` real boxes per set (``None``: all ``N``).
        iou_threshold: a box is a duplicate of an earlier kept box when their IoU is ``> iou_threshold``.
        backend: ``"auto"`` (Triton on CUDA for ``N <= MAX_TRITON_BOXES``, torch otherwise), ``"triton"``
            or ``"torch"``.
        check_nan: raise ``ValueError`` naming the batch index if a real box holds NaN/inf.

    Returns:
        ``[B, N]`` bool keep mask (``[N]`` for unbatched input); ``False`` beyond each set's length.
    """
    b3, _, unbatched = _checks.as_batched_pair(boxes, "boxes", boxes, "boxes")
    iou_threshold = _checks.check_threshold(iou_threshold, "iou_threshold")
    length = _checks.check_lengths(lengths, b3.shape[0], b3.shape[1], "lengths", b3.device)
    if check_nan:
        _checks.check_finite(b3, length, "boxes")
    chosen = _checks.resolve_backend(backend, b3.device)
    if chosen == "triton" and b3.shape[1] > MAX_TRITON_BOXES:
        if backend == "triton":
            raise ValueError(f"the Triton dedup kernel handles at most {MAX_TRITON_BOXES} boxes per set")
        chosen = "torch"
    if chosen == "triton":
        keep = _dedup_boxes_triton(b3, length, iou_threshold)
    else:
        keep = dedup_boxes_torch(b3, length, iou_threshold)
    return keep[0] if unbatched else keep

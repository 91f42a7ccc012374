"""IoU matrices between box sets: a Triton kernel, its torch reference, and the public ops.

Numbers policy (shared by every op in :mod:`kernels`, which all reuse the helpers in this file):

* Where the union is positive, IoU equals ``torchvision.ops.box_iou`` (max abs difference <= 1e-6 in
  fp32): same formula, same order of operations, ``inter / (area1 + area2 - inter)``.
* Degenerate boxes (zero or negative width/height, e.g. ``x2 < x1``) get area 0, and IoU is 0 wherever
  the union is 0. torchvision returns NaN for two zero-area boxes; we return 0 on purpose, because a NaN
  in a reward turns a whole preference batch into NaN.
* float16/bfloat16/float64 inputs are computed in float32 and the result is float32: the kernels are
  fp32, and both backends must return the same numbers.
* Contiguous and non-contiguous inputs are accepted (the Triton path reads through strides, no copy).
* Inference only: outputs carry no autograd graph (the Triton path is not differentiable, and the torch
  path runs under ``torch.no_grad`` so both behave alike).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import _checks, _guards, _workspace
from kernels._checks import LengthsLike

__all__ = [
    "batched_box_iou",
    "batched_box_iou_torch",
    "box_iou",
    "box_iou_torch",
    "pair_iou_torch",
    "valid_mask",
    "zero_padding",
]


# ----------------------------------------------------------------------------------------------- torch reference
# Dividing by max(union, FLT_MIN) instead of branching: a zero union forces a zero intersection (it is at
# most the smaller area), so 0 / FLT_MIN = 0, and every union >= FLT_MIN divides exactly as torchvision does.
FLT_MIN = torch.finfo(torch.float32).tiny


@torch.no_grad()
def pair_iou_torch(boxes1: Tensor, boxes2: Tensor, *, scratch_output: bool = False) -> Tensor:
    """IoU of every box in ``boxes1[..., N, 4]`` with every box in ``boxes2[..., M, 4]`` -> ``[..., N, M]``.

    Follows the numbers policy above; the operation order mirrors torchvision so fp32 results agree.

    Speed (this is the CPU hot path): each coordinate is first copied into its own contiguous plane, so the
    broadcast ``[..., N, 1] x [..., 1, M]`` ops run on unit-stride rows and vectorise (strided coordinate
    views are ~10x slower); the ``[..., N, M]`` temporaries live in the per-thread workspace
    (:mod:`kernels._workspace`) and are updated in place, because fresh multi-megabyte allocations
    (page faults) cost more than the arithmetic.

    Args:
        boxes1: ``[..., N, 4]`` boxes.
        boxes2: ``[..., M, 4]`` boxes with a broadcast-compatible batch shape.
        scratch_output: return the IoU in workspace memory too, valid only until the next ``kernels`` call
            on this thread; for internal callers that reduce the matrix immediately.
    """
    a = boxes1.float()
    b = boxes2.float()
    ax1, ay1, ax2, ay2 = (a[..., k].contiguous()[..., :, None] for k in range(4))  # [..., N, 1]
    bx1, by1, bx2, by2 = (b[..., k].contiguous()[..., None, :] for k in range(4))  # [..., 1, M]
    area_a = (ax2 - ax1).clamp_(min=0) * (ay2 - ay1).clamp_(min=0)
    area_b = (bx2 - bx1).clamp_(min=0) * (by2 - by1).clamp_(min=0)
    shape = torch.broadcast_shapes(ax1.shape, bx1.shape)
    buffers = _workspace.float_buffers(shape, 3 if scratch_output else 2, a.device)
    scratch, height = buffers[0], buffers[1]
    inter = buffers[2] if scratch_output else None  # None: a fresh tensor that the caller may keep
    inter = torch.minimum(ax2, bx2, out=inter)
    scratch = torch.maximum(ax1, bx1, out=scratch)
    inter.sub_(scratch).clamp_(min=0)  # width of the intersection
    height = torch.minimum(ay2, by2, out=height)
    height.sub_(torch.maximum(ay1, by1, out=scratch)).clamp_(min=0)
    inter.mul_(height)
    union = torch.add(area_a, area_b, out=scratch).sub_(inter).clamp_(min=FLT_MIN)
    return inter.div_(union)


def valid_mask(lengths: Tensor, size: int) -> Tensor:
    """``[B, size]`` bool mask that is True for the first ``lengths[b]`` positions of each set."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def zero_padding(boxes: Tensor, lengths: Tensor) -> Tensor:
    """float32 copy of ``[B, N, 4]`` boxes with rows past each length set to the empty box ``(0, 0, 0, 0)``.

    An empty box has IoU 0 with everything, so masking the ``[B, N, 4]`` input replaces masking the
    ``[B, N, M]`` output; ``where`` (not a multiply) also turns NaN padding into zeros.
    """
    keep = valid_mask(lengths, boxes.shape[1])[..., None]
    return torch.where(keep, boxes.float(), torch.zeros((), dtype=torch.float32, device=boxes.device))


@torch.no_grad()
def box_iou_torch(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Torch reference for :func:`box_iou`: ``[N, 4] x [M, 4] -> [N, M]`` float32."""
    return pair_iou_torch(boxes1, boxes2)


@torch.no_grad()
def batched_box_iou_torch(
    boxes1: Tensor, boxes2: Tensor, lengths1: Tensor, lengths2: Tensor, *, scratch_output: bool = False
) -> Tensor:
    """Torch reference for :func:`batched_box_iou`, vectorised over the batch (no Python loop).

    ``scratch_output``: see :func:`pair_iou_torch` (internal callers only).
    """
    padded1, padded2 = zero_padding(boxes1, lengths1), zero_padding(boxes2, lengths2)
    return pair_iou_torch(padded1, padded2, scratch_output=scratch_output)


# ---------------------------------------------------------------------------------------------------- triton
if _guards.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_boxes(base_ptr, offs, mask, stride_n, stride_c):
        """Load the four coordinates of boxes ``offs`` as float32 vectors (zeros where masked)."""
        ptrs = base_ptr + offs * stride_n
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(ptrs + stride_c, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + 2 * stride_c, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(ptrs + 3 * stride_c, mask=mask, other=0.0).to(tl.float32)
        return x1, y1, x2, y2

    @triton.jit
    def _pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
        """Broadcasting IoU with the same formula and operation order as :func:`pair_iou_torch`."""
        area_a = tl.maximum(ax2 - ax1, 0.0) * tl.maximum(ay2 - ay1, 0.0)
        area_b = tl.maximum(bx2 - bx1, 0.0) * tl.maximum(by2 - by1, 0.0)
        w = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
        h = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
        inter = w * h
        union = area_a + area_b - inter
        return inter / tl.maximum(union, 1.1754943508222875e-38)  # FLT_MIN: see the torch reference

    @triton.jit
    def _box_iou_kernel(
        a_ptr, b_ptr, len_a_ptr, len_b_ptr, out_ptr,
        N, M,
        stride_ab, stride_an, stride_ac,
        stride_bb, stride_bm, stride_bc,
        stride_ob, stride_on, stride_om,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """One program per (set, N tile, M tile): writes an IoU tile, zeros outside the set lengths."""
        batch = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_n = offs_n < tl.load(len_a_ptr + batch)
        valid_m = offs_m < tl.load(len_b_ptr + batch)
        ax1, ay1, ax2, ay2 = _load_boxes(a_ptr + batch * stride_ab, offs_n, valid_n, stride_an, stride_ac)
        bx1, by1, bx2, by2 = _load_boxes(b_ptr + batch * stride_bb, offs_m, valid_m, stride_bm, stride_bc)
        iou = _pair_iou(
            ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None],
            bx1[None, :], by1[None, :], bx2[None, :], by2[None, :],
        )  # fmt: skip
        # Masked loads already give padding the empty box (IoU 0); the explicit zero keeps that a guarantee.
        iou = tl.where(valid_n[:, None] & valid_m[None, :], iou, 0.0)
        out_ptrs = out_ptr + batch * stride_ob + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om
        tl.store(out_ptrs, iou, mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def block_size(n: int, cap: int) -> int:
    """Power-of-two tile size covering ``n`` (at least 16, at most ``cap``), as ``tl.arange`` requires."""
    size = 16
    while size < n and size < cap:
        size *= 2
    return size


def _batched_box_iou_triton(boxes1: Tensor, boxes2: Tensor, lengths1: Tensor, lengths2: Tensor) -> Tensor:
    """Launch :func:`_box_iou_kernel`; inputs are already validated ``[B, N, 4]`` / ``[B, M, 4]``."""
    batch, n, m = boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]
    out = torch.empty((batch, n, m), dtype=torch.float32, device=boxes1.device)
    if out.numel() == 0:
        return out
    block_n, block_m = block_size(n, 64), block_size(m, 64)
    grid = (batch, triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _box_iou_kernel[grid](
        boxes1, boxes2, lengths1.to(torch.int32), lengths2.to(torch.int32), out,
        n, m,
        *boxes1.stride(), *boxes2.stride(), *out.stride(),
        BLOCK_N=block_n, BLOCK_M=block_m,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ public ops
def batched_box_iou(
    boxes1: Tensor,
    boxes2: Tensor,
    lengths1: LengthsLike = None,
    lengths2: LengthsLike = None,
    *,
    backend: str = "auto",
    check_nan: bool = True,
) -> Tensor:
    """IoU matrices of padded box sets (Algorithm 1 step 5, one matrix per set).

    Args:
        boxes1: ``[B, N, 4]`` ``xyxy`` boxes (e.g. ground truth), any float dtype, any strides.
        boxes2: ``[B, M, 4]`` ``xyxy`` boxes (e.g. predictions), same device.
        lengths1: ``[B]`` number of real boxes per set in ``boxes1`` (``None``: all ``N``).
        lengths2: ``[B]`` number of real boxes per set in ``boxes2`` (``None``: all ``M``).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        check_nan: raise ``ValueError`` naming the batch index if a real box holds NaN/inf; turn off to
            save one reduction and host sync when inputs are known to be clean.

    Returns:
        ``[B, N, M]`` float32 IoU; entries beyond a set's length are 0. Numbers policy: module docstring.
    """
    a, b, unbatched = _checks.as_batched_pair(boxes1, "boxes1", boxes2, "boxes2")
    if unbatched:
        raise ValueError("batched_box_iou expects [B, N, 4] inputs; use box_iou for single [N, 4] sets")
    len1 = _checks.check_lengths(lengths1, a.shape[0], a.shape[1], "lengths1", a.device)
    len2 = _checks.check_lengths(lengths2, b.shape[0], b.shape[1], "lengths2", b.device)
    if check_nan:
        _checks.check_finite(a, len1, "boxes1")
        _checks.check_finite(b, len2, "boxes2")
    if _checks.resolve_backend(backend, a.device) == "triton":
        return _batched_box_iou_triton(a, b, len1, len2)
    return batched_box_iou_torch(a, b, len1, len2)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, backend: str = "auto", check_nan: bool = True) -> Tensor:
    """IoU matrix between two single box sets, a drop-in for ``torchvision.ops.box_iou``.

    Differs from torchvision only where it returns NaN (zero union): we return 0 (module docstring).

    Args:
        boxes1: ``[N, 4]`` ``xyxy`` boxes.
        boxes2: ``[M, 4]`` ``xyxy`` boxes on the same device.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`batched_box_iou`).
        check_nan: raise ``ValueError`` on NaN/inf coordinates (batch index 0).

    Returns:
        ``[N, M]`` float32 IoU.
    """
    for boxes, name in ((boxes1, "boxes1"), (boxes2, "boxes2")):
        if _checks.check_boxes(boxes, name).ndim != 2:
            raise ValueError(f"box_iou expects [N, 4] inputs, got {name} {tuple(boxes.shape)}; use batched_box_iou")
    return batched_box_iou(boxes1[None], boxes2[None], backend=backend, check_nan=check_nan)[0]

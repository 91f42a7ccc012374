"""IoU thresholding (Algorithm 1 step 6): keep ``iou >= threshold``, zero the rest.

``p[i, j] = m[i, j] if m[i, j] >= threshold else 0``. The comparison is ``>=`` because the paper zeroes
only ``m < 0.5``, so an IoU of exactly 0.5 counts. Output is a new float32 tensor (inputs of any float
dtype are compared in float32); inference only, no autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import _checks, _guards

__all__ = ["keep_at_least_", "threshold_iou", "threshold_iou_torch"]


def keep_at_least_(iou: Tensor, threshold: float) -> Tensor:
    """In place on a float32 tensor: ``iou[iou < threshold] = 0`` (the comparison is made in float32).

    ``torch.threshold_`` keeps ``x > t``; passing the float32 number just below ``threshold`` turns that
    into ``x >= threshold`` exactly. It is one vectorised pass, ~10x faster on CPU than ``masked_fill_``
    with a boolean mask, and this sits on the localization-score hot path.
    """
    t = torch.tensor(threshold, dtype=torch.float32)
    below = float(torch.nextafter(t, torch.tensor(-math.inf, dtype=torch.float32)))
    return torch.nn.functional.threshold(iou, below, 0.0, inplace=True)


@torch.no_grad()
def threshold_iou_torch(iou: Tensor, threshold: float = 0.5) -> Tensor:
    """Torch reference for :func:`threshold_iou`."""
    return keep_at_least_(iou.to(torch.float32, copy=True), threshold)


if _guards.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _threshold_kernel(in_ptr, out_ptr, numel, threshold, BLOCK: tl.constexpr):
        """Elementwise keep-or-zero over a flat contiguous buffer."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Zero what is below rather than keep what is above, so a NaN survives exactly as on the torch path.
        tl.store(out_ptr + offs, tl.where(x < threshold, 0.0, x), mask=mask)


def _threshold_iou_triton(iou: Tensor, threshold: float) -> Tensor:
    """Launch :func:`_threshold_kernel` over a contiguous copy/view of ``iou``."""
    src = iou.contiguous()
    out = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    if src.numel():
        block = 1024
        _threshold_kernel[(triton.cdiv(src.numel(), block),)](src, out, src.numel(), threshold, BLOCK=block)
    return out


def threshold_iou(iou: Tensor, threshold: float = 0.5, *, backend: str = "auto", check_nan: bool = True) -> Tensor:
    """Zero IoU entries below ``threshold`` (Algorithm 1 step 6).

    Args:
        iou: IoU tensor of any shape (typically ``[N, M]`` or ``[B, N, M]``), any float dtype.
        threshold: entries ``>= threshold`` are kept, the rest become 0.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        check_nan: raise ``ValueError`` if ``iou`` holds NaN (naming the batch index for 3D input). With
            the check off, NaN entries pass through unchanged on both backends (never silently zeroed).

    Returns:
        float32 tensor of the same shape.
    """
    if not isinstance(iou, Tensor) or not iou.dtype.is_floating_point:
        raise TypeError(f"iou must be a floating torch.Tensor, got {getattr(iou, 'dtype', type(iou).__name__)}")
    threshold = _checks.check_threshold(threshold, "threshold")
    if check_nan and iou.numel() and bool(torch.isnan(iou).any()):
        where = torch.isnan(iou).nonzero()[0].tolist()
        detail = f"batch index {where[0]}" if iou.ndim == 3 else f"index {tuple(where)}"
        raise ValueError(f"iou has NaN at {detail}")
    if _checks.resolve_backend(backend, iou.device) == "triton":
        return _threshold_iou_triton(iou, threshold)
    return threshold_iou_torch(iou, threshold)

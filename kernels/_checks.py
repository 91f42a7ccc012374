"""Validation shared by every op: backend names, box shapes/dtypes, set lengths and NaN checks.

Why in one place: each public op accepts the same kinds of arguments (one or two box sets, batched or
not, optional lengths) and must reject bad input with the same messages, before anything is launched on
a device, where a shape error turns into an out-of-bounds read instead of an exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels import _guards

__all__ = [
    "BACKENDS",
    "as_batched_pair",
    "check_boxes",
    "check_finite",
    "check_lengths",
    "check_threshold",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

LengthsLike = Tensor | Sequence[int] | None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"|"triton"|"torch"`` into the backend that will actually run.

    ``"auto"`` picks Triton only for CUDA tensors: on CPU the interpreter is orders of magnitude slower
    than torch, so it is something tests ask for explicitly, never a default.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` requested but Triton is missing, or the tensors are not on CUDA and the
            interpreter is off.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if _guards.has_triton() and device.type == "cuda" else "torch"
    if not _guards.has_triton():
        raise RuntimeError("backend='triton' requested but triton is not importable; use backend='torch'")
    if device.type != "cuda" and not _guards.triton_interpret():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device.type}); for CPU set TRITON_INTERPRET=1 in the "
            "environment before importing kernels (or triton), or use backend='torch'"
        )
    return "triton"


def check_boxes(boxes: Tensor, name: str) -> Tensor:
    """Check one box tensor: a floating ``[N, 4]`` or ``[B, N, 4]`` tensor in ``xyxy`` order."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {boxes.dtype}")
    if boxes.ndim not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] or [B, N, 4] (xyxy), got {tuple(boxes.shape)}")
    return boxes


def as_batched_pair(a: Tensor, name_a: str, b: Tensor, name_b: str) -> tuple[Tensor, Tensor, bool]:
    """Check two box sets and give both a batch dimension.

    Returns:
        ``(a3, b3, unbatched)``: ``[B, N, 4]`` and ``[B, M, 4]`` views, and whether the inputs were
        single ``[N, 4]`` sets (so the caller squeezes the batch dimension off its result).
    """
    check_boxes(a, name_a)
    check_boxes(b, name_b)
    if a.ndim != b.ndim:
        raise ValueError(f"{name_a} and {name_b} must both be batched or both unbatched, got {a.ndim}D and {b.ndim}D")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.ndim == 2:
        return a.unsqueeze(0), b.unsqueeze(0), True
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size, got {a.shape[0]} and {b.shape[0]}")
    return a, b, False


def check_lengths(lengths: LengthsLike, batch: int, size: int, name: str, device: torch.device) -> Tensor:
    """Validate per-set lengths and return them as an ``int64`` ``[B]`` tensor on ``device``.

    ``None`` means every set is full (length ``size``). Lengths are how padded batches say which rows
    are real; a length above the padded size would make kernels read past the set, so it is an error.
    """
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.int64, device=device)
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}], got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if batch and (bool((lengths < 0).any()) or bool((lengths > size).any())):
        raise ValueError(f"{name} must lie in [0, {size}], got {lengths.tolist()}")
    return lengths


def check_finite(boxes: Tensor, lengths: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the first batch index whose valid boxes hold NaN or +-inf.

    Only rows inside each set's length are checked: padding is never read by the ops, so whatever it
    holds is harmless. Infinities are rejected with NaN because ``inf - inf`` makes the IoU NaN.
    Cost: a row sum, a few ``[B, N]`` ops and one host sync, skipped entirely with ``check_nan=False``.
    """
    if boxes.numel() == 0:
        return
    # A row's fp32 sum is finite iff its four coordinates are (short of |x| ~ 1e38, which would overflow the
    # areas anyway): one reduction instead of the several passes ``isfinite`` makes over every coordinate.
    row_ok = torch.isfinite(boxes.sum(dim=-1, dtype=torch.float32))
    valid = torch.arange(boxes.shape[1], device=boxes.device)[None, :] < lengths[:, None]
    bad_rows = valid & ~row_ok
    if bool(bad_rows.any()):
        batch_index = int(bad_rows.any(dim=1).nonzero()[0, 0])
        row = int(bad_rows[batch_index].nonzero()[0, 0])
        raise ValueError(f"{name} has NaN or infinite coordinates at batch index {batch_index} (box {row})")


def check_threshold(value: float, name: str) -> float:
    """Thresholds must be real numbers; NaN would silently drop every box."""
    if isinstance(value, Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)

"""Import guards for the optional Triton backend, computed once and never raising.

Why one module: every kernel file asks the same three questions (is Triton importable, is there a CUDA
device, is the Triton CPU interpreter on) and must answer them identically. The answers are module
attributes read at call time through the helper functions below, so a test can flip them with
``monkeypatch.setattr(kernels._guards, "HAS_TRITON", False)`` or the :func:`override` context manager.

``TRITON_INTERPRET`` is read from the environment when this module is first imported. Triton itself
decides at ``@triton.jit`` decoration time (i.e. when ``kernels.box_iou`` etc. are imported) whether a
kernel runs compiled or interpreted, so the variable must be set before ``kernels`` (or anything importing
it) is imported; overriding the flag here afterwards only changes dispatch, not how kernels execute.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["HAS_CUDA", "HAS_TRITON", "TRITON_INTERPRET", "has_cuda", "has_triton", "override", "triton_interpret"]


def _detect_triton() -> bool:
    """True when ``triton`` imports; a broken install counts as absent instead of raising."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a half-installed triton must degrade to the torch path, whatever it raises
        return False
    return True


def _detect_cuda() -> bool:
    """True when torch sees a usable CUDA device; driver errors count as no device."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON: bool = _detect_triton()
HAS_CUDA: bool = _detect_cuda()


def has_triton() -> bool:
    """Whether the Triton backend is importable (reads the possibly overridden module flag)."""
    return HAS_TRITON


def has_cuda() -> bool:
    """Whether a CUDA device is available (reads the possibly overridden module flag)."""
    return HAS_CUDA


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return TRITON_INTERPRET


@contextmanager
def override(
    *, has_triton: bool | None = None, has_cuda: bool | None = None, triton_interpret: bool | None = None
) -> Iterator[None]:
    """Temporarily replace guard flags (for tests); ``None`` leaves a flag as detected.

    Example:
        >>> with override(has_triton=False):
        ...     ...  # backend="auto" now always picks torch
    """
    global HAS_TRITON, HAS_CUDA, TRITON_INTERPRET
    saved = (HAS_TRITON, HAS_CUDA, TRITON_INTERPRET)
    try:
        if has_triton is not None:
            HAS_TRITON = has_triton
        if has_cuda is not None:
            HAS_CUDA = has_cuda
        if triton_interpret is not None:
            TRITON_INTERPRET = triton_interpret
        yield
    finally:
        HAS_TRITON, HAS_CUDA, TRITON_INTERPRET = saved

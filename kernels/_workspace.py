"""Per-thread scratch memory for the torch path's ``[B, N, M]`` temporaries on CPU.

Why: on CPU the torch path of the localization score is dominated not by arithmetic but by page faults.
Each call needs a few multi-megabyte float32 buffers; glibc serves those with ``mmap`` (or trims them back
to the OS on free), so every call faults in and zeroes fresh pages, which costs ~2x the arithmetic
(measured on the 2-core dev box for B=512 sets of 32 x 32 boxes). Reusing one buffer per thread removes
that. Bounded by :data:`MAX_BYTES`; larger requests, and CUDA tensors (whose caching allocator already
reuses memory), get ``None`` and fall back to ordinary allocation. Views handed out are only valid until
the next request on the same thread, so callers must consume them before calling back into ``kernels``.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["MAX_BYTES", "float_buffers"]

MAX_BYTES = 64 * 2**20
_local = threading.local()


def float_buffers(shape: torch.Size | tuple[int, ...], count: int, device: torch.device) -> list[Tensor | None]:
    """``count`` distinct float32 tensors of ``shape`` carved from this thread's workspace, or ``None`` each.

    The contents are garbage (like ``torch.empty``); ``None`` means "allocate normally" and can be passed
    straight to an ``out=`` argument.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or 4 * numel * count > MAX_BYTES:
        return [None] * count
    buffer: Tensor | None = getattr(_local, "buffer", None)
    # A buffer made under `torch.inference_mode()` (e.g. inside Lightning's predict) cannot be written
    # outside it, and vice versa: make a new one when the mode changed.
    if (buffer is None or buffer.numel() < numel * count
            or buffer.is_inference() != torch.is_inference_mode_enabled()):
        buffer = torch.empty(numel * count, dtype=torch.float32)
        _local.buffer = buffer
    return [buffer[i * numel : (i + 1) * numel].view(shape) for i in range(count)]

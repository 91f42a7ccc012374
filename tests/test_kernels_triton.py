"""Kernels, Triton path: every Triton kernel against the torch path (same numbers), on awkward shapes.

How this runs without a GPU: Triton decides at ``@triton.jit`` decoration time, i.e. when
``kernels/*.py`` is first imported, whether a kernel is compiled or interpreted, and it reads
``TRITON_INTERPRET`` from the environment right then. Inside one pytest session another test module or
conftest may already have imported ``kernels``/``triton``, so setting ``os.environ`` at the top of this
file is not reliable (and would leak into other tests). Instead:

* ``test_triton_interpreted_in_subprocess`` re-runs this file in a fresh ``python -m pytest`` with
  ``TRITON_INTERPRET=1``; there, ``DEVICES == ["cpu"]`` and every case below runs in the interpreter.
* In the normal session the cases are parametrised with ``"cuda"`` only and marked ``gpu`` (skipped
  without CUDA by ``tests/conftest.py``), so on a GPU machine they run compiled.

Run the interpreted cases directly with ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py``.
The interpreter is slow, so shapes stay small (tens of boxes) while still crossing tile boundaries.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import HAND_CASES, near_duplicates, random_boxes

import kernels
from kernels import _guards

INTERPRETED = _guards.TRITON_INTERPRET  # what the kernels were actually decorated with
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu)]
needs_triton = pytest.mark.skipif(not _guards.HAS_TRITON, reason="triton is not importable")
pytestmark = needs_triton

BOX_SHAPES = [(1, 1, 1), (3, 17, 5), (2, 70, 33)]  # single box, ragged, > one 64-wide tile


def lengths_for(batch: int, size: int, seed: int) -> torch.Tensor:
    """Per-set lengths covering 0, full and something in between."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, size + 1, (batch,), generator=g)
    lengths[0] = size
    if batch > 1:
        lengths[1] = 0
    return lengths


def both(fn, *args, device: str, **kwargs):  # noqa: ANN001, ANN201 - thin test helper
    """Run one op with backend='triton' and 'torch' on ``device``."""
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*moved, backend="triton", **kwargs), fn(*moved, backend="torch", **kwargs)


# ---------------------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", BOX_SHAPES)
def test_batched_box_iou_triton_matches_torch(device: str, shape: tuple[int, int, int]) -> None:
    batch, n, m = shape
    a, b = random_boxes(batch, n, seed=n), random_boxes(batch, m, seed=m + 1)
    len_a, len_b = lengths_for(batch, n, 1), lengths_for(batch, m, 2)
    tri, ref = both(kernels.batched_box_iou, a, b, len_a, len_b, device=device)
    assert tri.dtype == torch.float32 and tri.shape == (batch, n, m)
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_triton_hand_cases_and_large_coordinates(device: str) -> None:
    a = torch.tensor([c[0] for c in HAND_CASES], dtype=torch.float32)
    b = torch.tensor([c[1] for c in HAND_CASES], dtype=torch.float32)
    tri, ref = both(kernels.box_iou, a, b, device=device)
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)
    expected = torch.tensor([c[2] for c in HAND_CASES], dtype=torch.float32)
    torch.testing.assert_close(tri.diagonal().cpu(), expected, atol=1e-6, rtol=0)
    assert not torch.isnan(tri).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_triton_dtypes_compute_in_fp32(device: str, dtype: torch.dtype) -> None:
    a, b = random_boxes(2, 9, seed=3).to(dtype), random_boxes(2, 6, seed=4).to(dtype)
    tri, ref = both(kernels.batched_box_iou, a, b, device=device)
    assert tri.dtype == torch.float32
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)
    tri, ref = both(kernels.localization_score, a, b, device=device, threshold=0.1)
    assert tri.dtype == torch.float32
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_non_contiguous_inputs(device: str) -> None:
    a, b = random_boxes(3, 10, seed=5).to(device), random_boxes(3, 7, seed=6).to(device)
    a_strided = a.transpose(1, 2).contiguous().transpose(1, 2)
    b_sliced = torch.cat([b, torch.zeros_like(b)], dim=-1)[..., :4]
    assert not a_strided.is_contiguous() and not b_sliced.is_contiguous()
    expected = kernels.batched_box_iou(a, b, backend="torch")
    torch.testing.assert_close(kernels.batched_box_iou(a_strided, b_sliced, backend="triton"), expected)
    expected = kernels.localization_score(a, b, backend="torch", threshold=0.2)
    got = kernels.localization_score(a_strided, b_sliced, backend="triton", threshold=0.2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_iou_triton_matches_torch(device: str) -> None:
    iou = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(7))
    iou[0, 0, :4] = torch.tensor([0.5, 0.0, 1.0, 0.3])  # values equal to a threshold are kept
    for view in (iou, iou.transpose(1, 2), iou.half()):
        for threshold in (0.5, 0.0, 0.9, 0.3):
            tri, ref = both(kernels.threshold_iou, view, threshold, device=device)
            assert tri.dtype == torch.float32 and tri.shape == view.shape
            torch.testing.assert_close(tri, ref, atol=0, rtol=0)
    assert kernels.threshold_iou(torch.zeros(0, 3, device=device), backend="triton").shape == (0, 3)
    iou[1, 2, 3] = float("nan")
    tri, ref = both(kernels.threshold_iou, iou, 0.5, device=device, check_nan=False)
    assert tri[1, 2, 3].isnan() and torch.equal(tri.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "n", "m", "threshold"), [(5, 33, 40, 0.5), (3, 7, 70, 0.3), (2, 1, 1, 0.0)])
def test_localization_score_triton_matches_torch(device: str, batch: int, n: int, m: int, threshold: float) -> None:
    gt, pred = near_duplicates(batch, n, n), near_duplicates(batch, m, n)  # same centres -> real matches
    gt_len, pred_len = lengths_for(batch, n, 8), lengths_for(batch, m, 9)
    tri, ref = both(kernels.localization_score, gt, pred, gt_len, pred_len, device=device, threshold=threshold)
    assert tri.shape == (batch,)
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)
    if batch > 1:
        assert tri[1] == 0  # gt length 0 -> score 0
    assert ref.max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_localization_score_triton_keeps_iou_equal_to_threshold(device: str) -> None:
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    pred = torch.tensor([[0.0, 0, 10, 20], [20, 20, 30, 50]])  # IoUs exactly 0.5 and 1/3
    for threshold, expected in ((0.5, 0.25), (0.3, (0.5 + 1 / 3) / 2), (0.6, 0.0)):
        tri, ref = both(kernels.localization_score, gt, pred, device=device, threshold=threshold)
        assert tri.item() == pytest.approx(expected, abs=1e-6) and ref.item() == pytest.approx(expected, abs=1e-6)
    (index, iou), _ = both(kernels.match_boxes, pred, gt, device=device, threshold=0.5)
    assert index.tolist() == [-1, -1] and iou.tolist() == pytest.approx([0.5, 1 / 3])


@pytest.mark.parametrize("device", DEVICES)
def test_localization_score_triton_empty_and_unbatched(device: str) -> None:
    gt, pred = random_boxes(1, 5, seed=10)[0], random_boxes(1, 4, seed=11)[0]
    tri, ref = both(kernels.localization_score, gt, pred, device=device, threshold=0.0)
    assert tri.shape == () and torch.allclose(tri, ref, atol=1e-6)
    for g, p in ((torch.zeros(0, 4), pred), (gt, torch.zeros(0, 4)), (torch.zeros(2, 0, 4), torch.zeros(2, 3, 4))):
        tri, ref = both(kernels.localization_score, g, p, device=device)
        assert torch.equal(tri, ref) and not tri.any()
    empty = torch.zeros(0, 3, 4, device=device)
    assert kernels.localization_score(empty, empty, backend="triton").shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "n"), [(4, 40, 35), (2, 3, 1), (1, 70, 5)])
def test_match_boxes_triton_matches_torch(device: str, batch: int, m: int, n: int) -> None:
    pred, gt = near_duplicates(batch, m, m), near_duplicates(batch, n, m)
    # Exact duplicates in gt, in the same 32-wide tile and in a later tile: ties go to the lower index.
    gt[:, n // 2] = gt[:, 0]
    gt[:, -1] = gt[:, 0]
    pred[:, 0] = gt[:, 0]
    pred_len, gt_len = lengths_for(batch, m, 12), lengths_for(batch, n, 13)
    for threshold in (0.5, -1.0):
        (tri_i, tri_v), (ref_i, ref_v) = both(
            kernels.match_boxes, pred, gt, pred_len, gt_len, device=device, threshold=threshold
        )
        assert tri_i.dtype == torch.int64
        assert torch.equal(tri_i, ref_i)
        torch.testing.assert_close(tri_v, ref_v, atol=1e-6, rtol=0)
    (tri_i, _), (ref_i, _) = both(kernels.match_boxes, pred[0], torch.zeros(0, 4), device=device)
    assert torch.equal(tri_i, ref_i) and (tri_i == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "n", "iou_threshold"), [(4, 20, 0.5), (3, 37, 0.3), (2, 1, 0.5)])
def test_dedup_boxes_triton_matches_torch(device: str, batch: int, n: int, iou_threshold: float) -> None:
    boxes = near_duplicates(batch, n, n)
    boxes[:, -1] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # a degenerate box is never a duplicate
    lengths = lengths_for(batch, n, 14)
    tri, ref = both(kernels.dedup_boxes, boxes, lengths, device=device, iou_threshold=iou_threshold)
    assert tri.dtype == torch.bool and torch.equal(tri, ref)
    if n > 2:
        assert (~ref[0, : lengths[0]]).any(), "the case should contain duplicates"
    tri, ref = both(kernels.dedup_boxes, boxes[0], device=device, iou_threshold=iou_threshold)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_nan_check_runs_before_launch(device: str) -> None:
    a = random_boxes(3, 4, seed=15).to(device)
    a[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="batch index 1"):
        kernels.localization_score(a, a, backend="triton")


# ----------------------------------------------------------------------------------------- interpreter driver
@pytest.mark.skipif(INTERPRETED, reason="already running under TRITON_INTERPRET=1")
def test_triton_interpreted_in_subprocess() -> None:
    """Run the cases above on CPU in the Triton interpreter, in a fresh process (see module docstring)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20, output  # the cases really ran, not all skipped

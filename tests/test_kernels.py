"""Kernels, torch path: each op against a plain-Python Algorithm 1 reference and torchvision.

The Triton path is tested in ``tests/test_kernels_triton.py`` (interpreted on CPU in a subprocess, and on
CUDA when present). Here everything runs with ``backend="torch"`` (or ``"auto"`` on CPU, which is torch).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torchvision

import kernels
from kernels import _checks, _guards, _workspace

# ------------------------------------------------------------------------------------ plain-Python reference
Box = list[float]


def py_iou(a: Box, b: Box) -> float:
    """IoU in float64 Python, with the documented policy: clamped areas, 0 when the union is 0."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def py_localization_score(gt: list[Box], pred: list[Box], threshold: float = 0.5) -> float:
    """Algorithm 1 steps 5-7 written as loops: mean_i max_j p[i, j], p = m if m >= t else 0."""
    if not gt:
        return 0.0
    total = 0.0
    for g in gt:
        p = [py_iou(g, q) for q in pred]
        p = [v if v >= threshold else 0.0 for v in p]
        total += max(p, default=0.0)
    return total / len(gt)


def py_dedup(boxes: list[Box], iou_threshold: float) -> list[bool]:
    """Greedy in text order: drop a box overlapping an earlier *kept* box with IoU > threshold."""
    keep: list[bool] = []
    for i, box in enumerate(boxes):
        keep.append(not any(keep[j] and py_iou(box, boxes[j]) > iou_threshold for j in range(i)))
    return keep


def py_match(pred: list[Box], gt: list[Box], threshold: float = 0.5) -> tuple[list[int], list[float]]:
    """Best ground truth per prediction (first index on ties), -1 when best IoU <= threshold."""
    index, best = [], []
    for q in pred:
        ious = [py_iou(q, g) for g in gt]
        if not ious:
            index.append(-1)
            best.append(0.0)
            continue
        j = max(range(len(ious)), key=lambda k: (ious[k], -k))
        index.append(j if ious[j] > threshold else -1)
        best.append(ious[j])
    return index, best


# --------------------------------------------------------------------------------------------------- helpers
def random_boxes(batch: int, n: int, *, scale: float = 100.0, degenerate: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Random xyxy boxes; a fraction is degenerate (zero width/height or inverted)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=g) * scale
    wh = torch.rand(batch, n, 2, generator=g) * scale / 2
    boxes = torch.cat([xy, xy + wh], dim=-1)
    bad = torch.rand(batch, n, generator=g) < degenerate
    flip = torch.rand(batch, n, generator=g) < 0.5
    boxes[bad & flip, 2] = boxes[bad & flip, 0]  # zero width
    boxes[bad & ~flip, 3] = boxes[bad & ~flip, 1] - 5.0  # inverted: y2 < y1
    return boxes


def near_duplicates(batch: int, n: int, seed: int) -> torch.Tensor:
    """Boxes drawn around a few centres so that many pairs overlap (exercises dedup and match)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 3, 2, generator=g) * 50
    pick = torch.randint(0, 3, (batch, n), generator=g)
    c = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2)) + torch.randn(batch, n, 2, generator=g)
    size = 10 + torch.rand(batch, n, 2, generator=g) * 4
    return torch.cat([c - size / 2, c + size / 2], dim=-1)


def as_lists(boxes: torch.Tensor, length: int) -> list[Box]:
    return [[float(v) for v in row] for row in boxes[:length].tolist()]


HAND_CASES = [
    # (box a, box b, expected IoU)
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # disjoint
    ([5, 5, 10, 10], [0, 0, 20, 20], 25 / 400),  # nested
    ([0, 0, 10, 10], [0, 0, 20, 10], 0.5),  # nested, exactly the paper's threshold
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching edges
    ([0, 0, 1, 1], [1, 1, 2, 2], 0.0),  # touching corners
    ([0, 0, 2, 2], [1, 0, 3, 2], 1 / 3),  # half overlap
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # two points: union 0 -> 0, torchvision says NaN
    ([2, 2, 1, 1], [0, 0, 3, 3], 0.0),  # inverted box has area 0
    ([3, 0, 3, 9], [0, 0, 9, 9], 0.0),  # zero-width line inside a box
    ([10000, 10000, 12000, 11000], [11000, 10000, 13000, 11000], 1e6 / 3e6),  # ~1e4 px coordinates
    ([0, 0, 16384, 16384], [0, 0, 16384, 8192], 0.5),  # large, exact in fp32
]


# ----------------------------------------------------------------------------------------------------- IoU
@pytest.mark.parametrize(("a", "b", "expected"), HAND_CASES)
def test_box_iou_hand_worked(a: Box, b: Box, expected: float) -> None:
    iou = kernels.box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))
    assert iou.shape == (1, 1) and iou.dtype == torch.float32
    assert iou.item() == pytest.approx(expected, abs=1e-6)
    assert py_iou(a, b) == pytest.approx(expected, abs=1e-12)


def test_box_iou_matches_torchvision_where_union_positive() -> None:
    for seed, scale in [(0, 1.0), (1, 100.0), (2, 1e4)]:
        a = random_boxes(1, 37, scale=scale, degenerate=0.0, seed=seed)[0]
        b = random_boxes(1, 23, scale=scale, degenerate=0.0, seed=seed + 10)[0]
        ours = kernels.box_iou(a, b, backend="torch")
        ref = torchvision.ops.box_iou(a, b)
        assert not torch.isnan(ref).any()
        assert (ours - ref).abs().max().item() <= 1e-6


def test_box_iou_zero_where_torchvision_is_nan() -> None:
    points = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 9.0]])
    ref = torchvision.ops.box_iou(points, points)
    ours = kernels.box_iou(points, points)
    assert torch.isnan(ref).any(), "torchvision's 0/0 behaviour changed; revisit the numbers policy docs"
    assert torch.equal(ours, torch.zeros(2, 2))


def test_box_iou_random_against_python_reference() -> None:
    a = random_boxes(1, 19, seed=3)[0]
    b = random_boxes(1, 11, seed=4)[0]
    ours = kernels.box_iou(a, b, backend="torch")
    expected = torch.tensor([[py_iou(x, y) for y in as_lists(b, 11)] for x in as_lists(a, 19)])
    assert torch.allclose(ours, expected.float(), atol=1e-6, rtol=0)


def test_batched_box_iou_padding_is_zero_and_sets_independent() -> None:
    a, b = random_boxes(4, 6, seed=5), random_boxes(4, 5, seed=6)
    len_a, len_b = torch.tensor([6, 0, 3, 2]), torch.tensor([5, 4, 0, 1])
    out = kernels.batched_box_iou(a, b, len_a, len_b, backend="torch")
    assert out.shape == (4, 6, 5)
    for i in range(4):
        na, nb = int(len_a[i]), int(len_b[i])
        assert torch.equal(out[i, :na, :nb], kernels.box_iou(a[i, :na], b[i, :nb]))
        assert out[i, na:].abs().sum() == 0 and out[i, :, nb:].abs().sum() == 0
    # Lengths as Python lists behave like tensors.
    assert torch.equal(out, kernels.batched_box_iou(a, b, [6, 0, 3, 2], [5, 4, 0, 1]))


def test_box_iou_empty_sets() -> None:
    assert kernels.box_iou(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    assert kernels.batched_box_iou(torch.zeros(2, 4, 4), torch.zeros(2, 0, 4)).shape == (2, 4, 0)
    assert kernels.batched_box_iou(torch.zeros(0, 4, 4), torch.zeros(0, 2, 4)).shape == (0, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_compute_in_fp32(dtype: torch.dtype) -> None:
    a, b = random_boxes(2, 5, seed=7).to(dtype), random_boxes(2, 4, seed=8).to(dtype)
    out = kernels.batched_box_iou(a, b, backend="torch")
    assert out.dtype == torch.float32
    assert torch.equal(out, kernels.batched_box_iou(a.float(), b.float(), backend="torch"))
    score = kernels.localization_score(a, b, backend="torch")
    assert score.dtype == torch.float32


def test_non_contiguous_inputs() -> None:
    a, b = random_boxes(3, 8, seed=9), random_boxes(3, 6, seed=10)
    a_strided = a.transpose(1, 2).contiguous().transpose(1, 2)  # coordinate stride != 1
    b_sliced = torch.cat([b, torch.zeros_like(b)], dim=-1)[..., :4]  # box stride 8
    assert not a_strided.is_contiguous() and not b_sliced.is_contiguous()
    assert torch.equal(kernels.batched_box_iou(a_strided, b_sliced), kernels.batched_box_iou(a, b))


def test_outputs_carry_no_autograd_graph() -> None:
    a = random_boxes(1, 4, seed=11).requires_grad_(True)
    assert not kernels.batched_box_iou(a, a.detach()).requires_grad
    assert not kernels.localization_score(a, a.detach()).requires_grad


def test_returned_matrices_never_alias_the_cpu_workspace() -> None:
    a, b = random_boxes(4, 9, seed=16), random_boxes(4, 7, seed=17)
    first = kernels.batched_box_iou(a, b)
    kept = first.clone()
    kernels.localization_score(b, a)  # reuses the workspace for its scratch IoU matrix
    kernels.match_boxes(b, a)
    kernels.dedup_boxes(a, iou_threshold=0.5)
    kernels.batched_box_iou(b, a)
    assert torch.equal(first, kept)


def test_workspace_is_bounded_and_cpu_only() -> None:
    small = _workspace.float_buffers((2, 3, 4), 2, torch.device("cpu"))
    assert [t.shape for t in small] == [(2, 3, 4), (2, 3, 4)]
    assert small[0].data_ptr() != small[1].data_ptr()
    assert _workspace.float_buffers((_workspace.MAX_BYTES,), 1, torch.device("cpu")) == [None]
    assert _workspace.float_buffers((2, 3), 2, torch.device("meta")) == [None, None]


# -------------------------------------------------------------------------------------------- threshold
def test_threshold_iou_keeps_ge_threshold() -> None:
    iou = torch.tensor([[0.2, 0.5, 0.49999], [0.75, 0.0, 1.0]])
    out = kernels.threshold_iou(iou)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.0], [0.75, 0.0, 1.0]]))
    assert torch.equal(kernels.threshold_iou(iou.t(), threshold=0.7), torch.tensor([[0, 0.75], [0, 0], [0, 1.0]]))
    assert kernels.threshold_iou(iou.half()).dtype == torch.float32
    # A threshold that float32 cannot hold: compared in float32, so fp32(0.3) itself is kept, its
    # predecessor is not.
    at = torch.tensor([0.3], dtype=torch.float32)
    below = torch.nextafter(at, torch.tensor(0.0))
    assert kernels.threshold_iou(torch.cat([at, below]), threshold=0.3).tolist() == [at.item(), 0.0]


def test_threshold_iou_rejects_nan_with_batch_index() -> None:
    iou = torch.zeros(3, 2, 2)
    iou[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="batch index 2"):
        kernels.threshold_iou(iou)
    assert kernels.threshold_iou(iou, check_nan=False)[2, 1, 0].isnan()  # propagated, not silently zeroed


# --------------------------------------------------------------------------------------- localization score
def test_localization_score_hand_worked() -> None:
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [100, 100, 110, 110]], dtype=torch.float32)
    pred = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 35], [0, 0, 10, 20]], dtype=torch.float32)
    # Row maxima: gt0 -> 1 (identical), gt1 -> 100/150, gt2 -> 0 (no overlap).
    assert kernels.localization_score(gt, pred).item() == pytest.approx((1 + 2 / 3) / 3, abs=1e-6)
    # IoU 100/210 < 0.5 is thresholded away; IoU exactly 0.5 counts (>=).
    assert kernels.localization_score(gt[:1], torch.tensor([[0.0, 0, 10, 21]])).item() == 0.0
    assert kernels.localization_score(gt[:1], torch.tensor([[0.0, 0, 10, 20]])).item() == pytest.approx(0.5)
    assert kernels.localization_score(gt[:1], torch.tensor([[0.0, 0, 10, 21]]), threshold=0.4).item() == (
        pytest.approx(100 / 210, abs=1e-6)
    )


def test_localization_score_unbatched_is_scalar() -> None:
    gt, pred = random_boxes(1, 5, seed=12)[0], random_boxes(1, 7, seed=13)[0]
    score = kernels.localization_score(gt, pred)
    assert score.shape == () and score.dtype == torch.float32


def test_localization_score_empty_sets_score_zero() -> None:
    gt, pred = random_boxes(3, 4, seed=14), random_boxes(3, 4, seed=15)
    scores = kernels.localization_score(gt, gt, gt_lengths=[0, 4, 2], pred_lengths=[4, 0, 2])
    assert scores[0] == 0 and scores[1] == 0 and scores[2] == pytest.approx(1.0)
    assert kernels.localization_score(torch.zeros(0, 4), pred[0]).item() == 0.0
    assert kernels.localization_score(gt[0], torch.zeros(0, 4)).item() == 0.0
    assert kernels.localization_score(torch.zeros(2, 0, 4), torch.zeros(2, 3, 4)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(4))
def test_localization_score_random_against_python_reference(seed: int) -> None:
    rng = random.Random(seed)
    batch, n, m = 6, 9, 12
    gt, pred = near_duplicates(batch, n, seed), near_duplicates(batch, m, seed)  # shared centres -> real hits
    gt[:, ::4] = random_boxes(batch, n, seed=seed)[:, ::4]  # plus some far/degenerate boxes
    gt_len = [rng.randint(0, n) for _ in range(batch)]
    pred_len = [rng.randint(0, m) for _ in range(batch)]
    gt_len[0], pred_len[1] = 0, 0
    threshold = [0.5, 0.3, 0.7, 0.0][seed]
    scores = kernels.localization_score(gt, pred, gt_len, pred_len, threshold=threshold, backend="torch")
    expected = [
        py_localization_score(as_lists(gt[i], gt_len[i]), as_lists(pred[i], pred_len[i]), threshold)
        for i in range(batch)
    ]
    assert scores.shape == (batch,)
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float32), atol=2e-6, rtol=0)
    assert scores.max() > 0, "the random case should contain real matches"


def test_localization_score_is_a_fused_threshold_rowmax_mean() -> None:
    gt, pred = near_duplicates(5, 7, 21), near_duplicates(5, 6, 21)
    iou = kernels.batched_box_iou(gt, pred)
    composed = kernels.threshold_iou(iou).amax(dim=2).mean(dim=1)
    assert torch.allclose(kernels.localization_score(gt, pred), composed, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- dedup
def test_dedup_hand_worked_greedy_chain() -> None:
    # b1 duplicates b0 (IoU 70/130); b2 overlaps b1 (70/130) but only b0 (40/160) among kept boxes -> kept.
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    assert kernels.dedup_boxes(boxes, iou_threshold=0.5).tolist() == [True, False, True, False, True]
    # Threshold is strict: IoU exactly 0.5 is not a duplicate.
    half = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 10]])
    assert kernels.dedup_boxes(half, iou_threshold=0.5).tolist() == [True, True]
    assert kernels.dedup_boxes(half, iou_threshold=0.49).tolist() == [True, False]


def test_dedup_degenerate_boxes_are_never_duplicates() -> None:
    points = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [3, 3, 2, 2]])
    assert kernels.dedup_boxes(points, iou_threshold=0.0).tolist() == [True, True, True]


@pytest.mark.parametrize("seed", range(3))
def test_dedup_random_against_python_reference(seed: int) -> None:
    rng = random.Random(seed)
    batch, n = 5, 14
    boxes = near_duplicates(batch, n, seed)
    lengths = [rng.randint(0, n) for _ in range(batch)]
    lengths[0] = 0
    thr = [0.5, 0.3, 0.7][seed]
    keep = kernels.dedup_boxes(boxes, torch.tensor(lengths), iou_threshold=thr, backend="torch")
    assert keep.dtype == torch.bool and keep.shape == (batch, n)
    for i in range(batch):
        expected = py_dedup(as_lists(boxes[i], lengths[i]), thr) + [False] * (n - lengths[i])
        assert keep[i].tolist() == expected
    assert (~keep).sum() > batch, "the random case should contain duplicates"


def test_dedup_unbatched_and_empty() -> None:
    assert kernels.dedup_boxes(torch.zeros(0, 4), iou_threshold=0.5).shape == (0,)
    assert kernels.dedup_boxes(torch.zeros(2, 0, 4), iou_threshold=0.5).shape == (2, 0)
    assert kernels.dedup_boxes(torch.tensor([[0.0, 0, 1, 1]]), iou_threshold=0.5).tolist() == [True]


# ---------------------------------------------------------------------------------------------------- match
def test_match_hand_worked() -> None:
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    pred = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 35], [0, 0, 10, 20], [50, 50, 60, 60]])
    index, iou = kernels.match_boxes(pred, gt)
    # Tie between identical gt 0 and 1 -> first; IoU exactly 0.5 is not a match (> 0.5 required).
    assert index.tolist() == [0, 2, -1, -1]
    assert iou.tolist() == pytest.approx([1.0, 2 / 3, 0.5, 0.0], abs=1e-6)
    assert kernels.match_boxes(pred, gt, threshold=0.49)[0].tolist() == [0, 2, 0, -1]


def test_match_padding_and_empty_ground_truth() -> None:
    pred, gt = near_duplicates(3, 5, 30), near_duplicates(3, 4, 30)
    index, iou = kernels.match_boxes(pred, gt, pred_lengths=[5, 2, 5], gt_lengths=[4, 4, 0], threshold=-1.0)
    # threshold -1 matches every real pair, so -1 can only come from padding or an empty gt set.
    assert (index[0] >= 0).all() and (index[1, :2] >= 0).all()
    assert (index[1, 2:] == -1).all() and (iou[1, 2:] == 0).all()
    assert (index[2] == -1).all() and (iou[2] == 0).all()
    index, iou = kernels.match_boxes(pred[0], torch.zeros(0, 4))
    assert index.tolist() == [-1] * 5 and iou.tolist() == [0.0] * 5


@pytest.mark.parametrize("seed", range(3))
def test_match_random_against_python_reference(seed: int) -> None:
    rng = random.Random(seed)
    batch, m, n = 5, 11, 8
    pred, gt = near_duplicates(batch, m, seed), near_duplicates(batch, n, seed)
    pred_len = [rng.randint(m // 2, m) for _ in range(batch)]
    gt_len = [rng.randint(n // 2, n) for _ in range(batch)]
    gt_len[0], pred_len[1] = 0, 0
    index, iou = kernels.match_boxes(pred, gt, pred_len, gt_len, backend="torch")
    assert index.dtype == torch.int64 and iou.dtype == torch.float32
    for i in range(batch):
        exp_index, exp_iou = py_match(as_lists(pred[i], pred_len[i]), as_lists(gt[i], gt_len[i]))
        pad = m - pred_len[i]
        assert index[i].tolist() == exp_index + [-1] * pad
        assert torch.allclose(iou[i], torch.tensor(exp_iou + [0.0] * pad), atol=2e-6, rtol=0)
    assert (index >= 0).sum() > batch, "the random case should contain matches"


# -------------------------------------------------------------------------------------- validation, dispatch
@pytest.mark.parametrize("op", ["batched_box_iou", "localization_score", "match_boxes", "dedup_boxes"])
def test_nan_raises_naming_batch_index_unless_disabled(op: str) -> None:
    a, b = random_boxes(4, 3, seed=40), random_boxes(4, 3, seed=41)
    a[2, 1, 3] = float("nan")
    a[3, 2, 0] = float("inf")  # padding (length 2 below): ignored
    lengths = torch.tensor([3, 3, 3, 2])

    def call(check_nan: bool) -> object:
        if op == "dedup_boxes":
            return kernels.dedup_boxes(a, lengths, iou_threshold=0.5, check_nan=check_nan)
        return getattr(kernels, op)(a, b, lengths, None, check_nan=check_nan)

    with pytest.raises(ValueError, match="batch index 2"):
        call(True)
    call(False)
    a[2, 1, 3] = 0.0
    call(True)  # NaN/inf only in padding is fine


def test_box_validation_errors() -> None:
    ok = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="floating"):
        kernels.batched_box_iou(ok.long(), ok)
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        kernels.batched_box_iou(torch.zeros(2, 3, 5), ok)
    with pytest.raises(ValueError, match="same batch size"):
        kernels.batched_box_iou(ok, torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="both be batched"):
        kernels.localization_score(ok, ok[0])
    with pytest.raises(ValueError, match="use box_iou"):
        kernels.batched_box_iou(ok[0], ok[0])
    with pytest.raises(ValueError, match="use batched_box_iou"):
        kernels.box_iou(ok, ok)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        kernels.batched_box_iou(ok, ok, lengths1=[1, 4])
    with pytest.raises(ValueError, match="shape"):
        kernels.batched_box_iou(ok, ok, lengths1=[1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        kernels.batched_box_iou(ok, ok, lengths1=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="real number"):
        kernels.localization_score(ok, ok, threshold=math.nan)
    with pytest.raises(ValueError, match="backend"):
        kernels.box_iou(ok[0], ok[0], backend="cuda")


def test_auto_backend_dispatch() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with _guards.override(has_triton=True, triton_interpret=False):
        assert _checks.resolve_backend("auto", cpu) == "torch"
        assert _checks.resolve_backend("auto", cuda) == "triton"
        assert _checks.resolve_backend("torch", cuda) == "torch"
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            _checks.resolve_backend("triton", cpu)
    with _guards.override(has_triton=True, triton_interpret=True):
        assert _checks.resolve_backend("triton", cpu) == "triton"
        assert _checks.resolve_backend("auto", cpu) == "torch"  # the interpreter is never a default
    with _guards.override(has_triton=False):
        assert _checks.resolve_backend("auto", cuda) == "torch"
        with pytest.raises(RuntimeError, match="not importable"):
            _checks.resolve_backend("triton", cuda)


def test_guard_flags_are_detected_once_and_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    detected = (_guards.HAS_TRITON, _guards.HAS_CUDA, _guards.TRITON_INTERPRET)
    assert all(isinstance(flag, bool) for flag in detected)
    assert _guards.HAS_CUDA == torch.cuda.is_available()
    with _guards.override(has_cuda=not detected[1], triton_interpret=not detected[2]):
        assert _guards.has_cuda() is not detected[1] and _guards.triton_interpret() is not detected[2]
    assert (_guards.has_triton(), _guards.has_cuda(), _guards.triton_interpret()) == detected
    monkeypatch.setattr(_guards, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable"):
        kernels.box_iou(torch.zeros(1, 4), torch.zeros(1, 4), backend="triton")

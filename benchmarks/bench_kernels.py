"""Benchmark the fused localization score (Algorithm 1 steps 5-7) over a batch of box sets.

Providers, side by side in one run so the ratio is measured under the same load:

* ``torchvision_loop``: what a straightforward implementation does, a Python loop over sets of
  ``torchvision.ops.box_iou`` + threshold + row max + mean;
* ``torch``: ``kernels.localization_score(..., backend="torch")``, vectorised over the batch;
* ``triton``: ``kernels.localization_score(..., backend="triton")`` (CUDA only; the fused kernel).

Usage::

    python benchmarks/bench_kernels.py                     # B=512 sets of 32 x 32 boxes, CPU (+ CUDA if present)
    python benchmarks/bench_kernels.py --batch 2048 --n 64 --m 64 --repeats 50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import kernels  # noqa: E402


def random_sets(batch: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Valid xyxy boxes in a 1000 px image, clustered so that thresholded matches exist."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=g) * 800
    wh = 20 + torch.rand(batch, n, 2, generator=g) * 180
    return torch.cat([xy, xy + wh], dim=-1).to(device)


def torchvision_loop(gt: torch.Tensor, pred: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Baseline: one ``torchvision.ops.box_iou`` per set, then threshold, row max and mean."""
    scores = []
    for g, p in zip(gt, pred):
        iou = torchvision.ops.box_iou(g, p)
        iou = torch.where(iou >= threshold, iou, torch.zeros_like(iou))
        scores.append(iou.max(dim=1).values.mean())
    return torch.stack(scores)


def time_providers(
    providers: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """``(median, min)`` wall time per provider in milliseconds.

    Calls are interleaved (one call of each provider per round) so that background load on a shared
    machine hits every provider alike and the ratio stays meaningful; the minimum is the least disturbed
    call of each provider. CUDA is synchronised around calls.
    """
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in samples.items()}


def bench_device(device: torch.device, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Time every provider available on ``device`` and check they agree before timing."""
    gt, pred = random_sets(args.batch, args.n, device, 0), random_sets(args.batch, args.m, device, 1)
    providers: dict[str, Callable[[], torch.Tensor]] = {
        "torchvision_loop": lambda: torchvision_loop(gt, pred),
        "torch": lambda: kernels.localization_score(gt, pred, backend="torch", check_nan=args.check_nan),
    }
    if device.type == "cuda":
        providers["triton"] = lambda: kernels.localization_score(gt, pred, backend="triton", check_nan=args.check_nan)
    reference = providers["torchvision_loop"]()
    for name, fn in providers.items():
        diff = (fn() - reference).abs().max().item()
        assert diff <= 1e-5, f"{name} disagrees with the torchvision loop by {diff}"
    return time_providers(providers, device, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--n", type=int, default=32, help="ground-truth boxes per set")
    parser.add_argument("--m", type=int, default=32, help="predicted boxes per set")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-check-nan", dest="check_nan", action="store_false", help="skip the NaN check")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(f"# localization_score, B={args.batch} sets of {args.n} x {args.m} boxes, threshold 0.5")
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, check_nan={args.check_nan}")  # fmt: skip
    print("| device | provider | median ms | min ms | speed-up vs torchvision_loop (median / min) |")
    print("|---|---|---:|---:|---:|")
    for device in devices:
        times = bench_device(device, args)
        base_median, base_min = times["torchvision_loop"]
        for name, (median, fastest) in times.items():
            print(
                f"| {device.type} | {name} | {median:.3f} | {fastest:.3f} "
                f"| {base_median / median:.1f}x / {base_min / fastest:.1f}x |"
            )
        if device.type == "cuda":
            print(f"# cuda: triton vs torch path (median): {times['torch'][0] / times['triton'][0]:.1f}x")


if __name__ == "__main__":
    main()

"""One-off probe (docs/results/notebook.md, "Acc@0.75 measured"): REC accuracy at any IoU threshold, and the gain of
each run over a start, recomputed from the per-sample IoUs the evaluator writes (``predictions-rank0.jsonl``),
overall and by target size. It needs no model: it reads finished evaluations, so runs made before a threshold was
reported can be measured at it. Run by hand, not part of the package:

    python docs/results/probes/rec_iou_table.py START_PREDICTIONS RUN_DIR... [--arm spr_boxes] [--thresholds 0.5 0.75]

A run folder is searched for ``eval_rec_test/``, ``eval_rec/`` or, in an experiment's ``seed_N`` folder,
``arms/ARM/eval_rec/``; folders named ``NAME_sN`` are grouped by ``NAME``, ``EXPERIMENT/seed_N`` by
``EXPERIMENT/ARM`` (mean ± sample std over seeds). Hits are ``IoU >= t`` on the IoUs as written (4 decimals),
so a count can differ by one from the evaluator's at an exact tie.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

SEARCH = ("eval_rec_test", "eval_rec")


def read_ious(path: Path, side: float) -> dict[str, list[float]]:
    """IoUs of one evaluation, all and by size (large: the target's longest side >= ``side`` px)."""
    out: dict[str, list[float]] = {"all": [], "small": [], "large": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        x1, y1, x2, y2 = record["gt_box"]
        out["all"].append(record["iou"])
        out["large" if max(x2 - x1, y2 - y1) >= side else "small"].append(record["iou"])
    return out


def accuracy(ious: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """Percent of ``ious`` at or above each threshold."""
    return [100.0 * sum(i >= t for i in ious) / max(len(ious), 1) for t in thresholds]


def find_predictions(folder: Path, arm: str) -> Path | None:
    for sub in (*SEARCH, f"arms/{arm}/eval_rec"):
        path = folder / sub / "predictions-rank0.jsonl"
        if path.is_file():
            return path
    return None


def group_name(folder: Path, arm: str) -> str:
    if re.fullmatch(r"seed_\d+", folder.name):
        return f"{folder.resolve().parent.name}/{arm}"
    return re.sub(r"_s\d+$", "", folder.name)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=Path, help="the start's REC predictions-rank0.jsonl")
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.9])
    parser.add_argument("--arm", default="spr_boxes", help="the arm read in an experiment's seed_N folders")
    parser.add_argument("--side", type=float, default=40.0, help="longest side (px) from which a target is large")
    args = parser.parse_args(argv)
    start = read_ious(args.start, args.side)
    groups: dict[str, list[dict[str, list[float]]]] = {}
    for folder in args.runs:
        path = find_predictions(folder, args.arm)
        if path is None:
            print(f"{folder}: no REC predictions, skipped")
            continue
        groups.setdefault(group_name(folder, args.arm), []).append(read_ious(path, args.side))
    print("thresholds", " ".join(f"{t:g}" for t in args.thresholds))
    for part in ("all", "small", "large"):
        base = accuracy(start[part], args.thresholds)
        print(f"\n{part} ({len(start[part])} targets); start: " + " | ".join(f"{v:.1f}" for v in base))
        for name, runs in groups.items():
            gains = [[a - b for a, b in zip(accuracy(r[part], args.thresholds), base)] for r in runs]
            cells = [f"{statistics.fmean(c):+.1f}" + (f" ± {statistics.stdev(c):.1f}" if len(c) > 1 else "")
                     for c in zip(*gains)]
            print(f"  {name:24s} n={len(runs)}  " + " | ".join(cells))


if __name__ == "__main__":
    main()

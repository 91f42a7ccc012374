"""One-off probe (docs/results/notebook.md, "A tower with more image tokens"): how precise a start's REC boxes are, read
from the per-sample boxes its evaluation wrote (``predictions-rank0.jsonl``), so starts of different shapes can be
set side by side without loading a model. For the hits at IoU >= 0.5 it gives their median IoU, the centre error in
pixels and as a share of the target's longest side, and the size error (median |log| of the predicted to the true
width and height); for all answers, Acc@0.5/0.75/0.9 and how often the predicted centre lies inside the target. Run
by hand, not part of the package:

    python docs/results/probes/rec_precision.py NAME=PREDICTIONS.jsonl [NAME=PREDICTIONS.jsonl ...] [--side 40]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path


def centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def precision_row(records: list[dict]) -> dict[str, float]:
    """The probe's numbers for one evaluation's records (``pred_box``, ``gt_box``, ``iou``)."""
    hits = [r for r in records if r["iou"] >= 0.5]
    centre_px, centre_rel, size_err, inside = [], [], [], 0
    for r in records:
        (px, py), (gx1, gy1, gx2, gy2) = centre(r["pred_box"]), r["gt_box"]
        inside += gx1 <= px <= gx2 and gy1 <= py <= gy2
    for r in hits:
        (px, py), (gx, gy) = centre(r["pred_box"]), centre(r["gt_box"])
        side = max(r["gt_box"][2] - r["gt_box"][0], r["gt_box"][3] - r["gt_box"][1])
        error = math.hypot(px - gx, py - gy)
        centre_px.append(error)
        centre_rel.append(error / side)
        for axis in (0, 1):
            predicted = r["pred_box"][axis + 2] - r["pred_box"][axis]
            true = r["gt_box"][axis + 2] - r["gt_box"][axis]
            size_err.append(abs(math.log(max(predicted, 1e-3) / max(true, 1e-3))))
    n = max(len(records), 1)

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    return {"n": len(records), "acc@0.5": 100 * len(hits) / n,
            "acc@0.75": 100 * sum(r["iou"] >= 0.75 for r in records) / n,
            "acc@0.9": 100 * sum(r["iou"] >= 0.9 for r in records) / n, "centre inside %": 100 * inside / n,
            "hits: median IoU": median([r["iou"] for r in hits]), "hits: centre error px": median(centre_px),
            "hits: centre error / side": median(centre_rel), "hits: |log size ratio|": median(size_err)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=path/to/predictions-rank0.jsonl")
    parser.add_argument("--side", type=float, default=40.0, help="large targets: longest side >= this (px)")
    args = parser.parse_args(argv)
    for item in args.runs:
        name, _, path = item.partition("=")
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        groups = {"all": records,
                  "small": [r for r in records if max(r["gt_box"][2] - r["gt_box"][0],
                                                      r["gt_box"][3] - r["gt_box"][1]) < args.side]}
        groups["large"] = [r for r in records if r not in groups["small"]]
        for group, rows in groups.items():
            row = precision_row(rows)
            print(f"{name:>16} {group:>5} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))


if __name__ == "__main__":
    main()

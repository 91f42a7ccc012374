"""One-off probe (docs/results.md, "Preference pairs on the evaluated task"): does DPO move REC at all when its
pairs are REC answers?

SPR samples region *descriptions* and is evaluated on REC and phrase grounding. Every SPR arm here, an oracle
reward and pairs that differ in box precision alone left REC where it was. This probe removes the task mismatch:
the policy answers the world's REC *training* questions (``sft_train.jsonl``, task ``rec``) ``--candidates`` times
each by sampling, every answer's first box is scored by IoU with the annotation, and the best answer is paired with
the worst. ``--chosen`` picks what the preferred side is:

* ``best``: the best sampled answer as written (on-policy, like SPR without refinement);
* ``refined``: the best sampled answer with its box snapped to the annotation when IoU > 0.5 (SPR's refinement);
* ``truth``: the annotation's answer (an SFT-like upper bound).

Pairs whose two sides are equal, or whose IoU gap is under ``--min-gap``, are dropped. The pairs are written as
an ordinary pairs folder for the DPO stage (``callbacks.ShardWriter``). Run by hand, not part of the package:

    python docs/results/probes/rec_pairs.py SFT_MODEL WORLD_DIR OUT_DIR [--queries 600] [--candidates 8]

then train on OUT_DIR with the experiment's dpo config (``--data.init_args.train_urls OUT_DIR``) and evaluate
the adapter with its eval_rec config. A summary (mean IoU of chosen and rejected, pairs kept) is printed and
written to ``OUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.ops import box_iou

from callbacks import ShardWriter
from spr_lightning.evaluation import rec_box
from spr_lightning.generation import CandidateGenerator
from spr_lightning.shards import SCHEMA_VERSION


def iou(box: tuple[float, ...], target: list[float]) -> float:
    """IoU of an answer's box with the target; 0 for an answer without a readable box."""
    if any(v != v for v in box):
        return 0.0
    return float(box_iou(torch.tensor([list(box)]), torch.tensor([target]))[0, 0])


def choose_pair(texts: list[str], ious: list[float], truth: str, chosen_mode: str,
                min_gap: float) -> tuple[str, float, str, float] | None:
    """``(chosen, chosen IoU, rejected, rejected IoU)`` of one question's sampled answers, or ``None`` when the
    pair would teach nothing (equal sides, a blank chosen side, or an IoU gap under ``min_gap``).

    The best-IoU answer is paired with the worst (the first of equals); ``chosen_mode`` ``truth`` puts the
    annotation's answer on the preferred side, ``refined`` does so only when the best answer's IoU is > 0.5 (a REC
    answer is one box, so SPR's snapping makes it the annotation's answer).
    """
    best = max(range(len(texts)), key=ious.__getitem__)
    worst = min(range(len(texts)), key=ious.__getitem__)
    chosen, chosen_iou = texts[best], ious[best]
    if chosen_mode == "truth" or (chosen_mode == "refined" and chosen_iou > 0.5):
        chosen, chosen_iou = truth, 1.0
    rejected, rejected_iou = texts[worst], ious[worst]
    if chosen == rejected or not chosen.strip() or chosen_iou - rejected_iou < min_gap:
        return None
    return chosen, chosen_iou, rejected, rejected_iou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the SFT start (a from_pretrained folder)")
    parser.add_argument("world", type=Path, help="the quickstart's world folder (sft_train.jsonl, images/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=600)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--chosen", choices=("best", "refined", "truth"), default="best")
    parser.add_argument("--min-gap", type=float, default=0.1, help="smallest IoU gap between chosen and rejected")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coord-format", default="minigpt_v2")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.world / "sft_train.jsonl").open()]
    rows = [r for r in rows if r["task"] == "rec"]
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.queries]
    generator = CandidateGenerator(args.model, args.coord_format, num_candidates=args.candidates,
                                   temperature=args.temperature, top_p=1.0, max_new_tokens=24, seed=args.seed)
    generator.configure_model()
    codec = generator.codec
    writer = ShardWriter(args.out, prefix="pairs", samples_per_shard=1000).start()
    torch.manual_seed(args.seed)
    stats: dict[str, Any] = {"queries": 0, "kept": 0, "no_gap": 0, "all_ious": [], "best_ious": [], "chosen_iou": [],
                             "rejected_iou": []}
    start = time.perf_counter()
    for first in range(0, len(rows), args.batch):
        batch = rows[first:first + args.batch]
        images = [Image.open(args.world / r["image"]).convert("RGB") for r in batch]
        with torch.no_grad():
            sizes = [tuple(row["image_size"]) for row in batch]
            answers = generator.generate([row["prompt"] for row in batch], images, sizes)
        for row, texts in zip(batch, answers):
            size = tuple(row["image_size"])
            target = row["boxes"][0]
            scores = [iou(rec_box(codec.decode(t, size)), target) for t in texts]
            stats["queries"] += 1
            stats["all_ious"].extend(scores)
            stats["best_ious"].append(max(scores))
            pair = choose_pair(texts, scores, row["answer"], args.chosen, args.min_gap)
            if pair is None:
                stats["no_gap"] += 1
                continue
            chosen, chosen_iou, rejected, rejected_iou = pair
            record = {
                "schema": SCHEMA_VERSION, "query_id": row["id"], "image_id": row["id"].split("-")[0],
                "file_name": row["image"], "image_size": list(size), "region": target, "prompt": row["prompt"],
                "chosen": chosen, "rejected": rejected, "coord_format": args.coord_format,
                "scores": {"chosen": {"iou": chosen_iou}, "rejected": {"iou": rejected_iou}},
                "source": args.model,
            }
            writer.write_sample({"__key__": row["id"], "json": json.dumps(record).encode(),
                                 "jpg": (args.world / row["image"]).read_bytes()})
            stats["kept"] += 1
            stats["chosen_iou"].append(chosen_iou)
            stats["rejected_iou"].append(rejected_iou)
        done = first + len(batch)
        print(f"{done}/{len(rows)} queries, {stats['kept']} pairs, {time.perf_counter() - start:.0f} s", flush=True)
    writer.finish()
    ious, best_ious = torch.tensor(stats["all_ious"]), torch.tensor(stats["best_ious"])
    summary = {
        "queries": stats["queries"], "pairs": stats["kept"], "dropped": stats["no_gap"], "chosen": args.chosen,
        "candidates": args.candidates, "temperature": args.temperature,
        "sampled_acc": {f"{t:.1f}": float((ious >= t).float().mean()) for t in (0.5, 0.6, 0.7, 0.8, 0.9)},
        "best_of_k_acc": {f"{t:.1f}": float((best_ious >= t).float().mean()) for t in (0.5, 0.6, 0.7, 0.8, 0.9)},
        "chosen_iou_mean": sum(stats["chosen_iou"]) / max(stats["kept"], 1),
        "rejected_iou_mean": sum(stats["rejected_iou"]) / max(stats["kept"], 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

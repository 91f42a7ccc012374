"""Preference pairs on the evaluated task: the policy's own REC answers, ranked by IoU with the annotation.

A control for the issue-#11 experiment, not part of SPR. SPR samples region *descriptions* and is evaluated on REC
and phrase grounding; when its pairs move neither, is the preference step unable to move REC on this policy at
all, or do description pairs not carry over? Here the policy answers the world's REC *training* questions
(``sft_train.jsonl``, task ``rec``) ``candidates`` times each by sampling; each answer's first box is scored by
IoU with the annotated box, and the best answer is paired with the worst, written as an ordinary pairs folder
(``callbacks.ShardWriter``; the DPO stage reads it as it reads SPR's). ``chosen`` picks the preferred side:

* ``best``: the best sampled answer as written (on-policy, like SPR without refinement; the default);
* ``refined``: the annotation's answer when the best answer's IoU is > 0.5 (a REC answer is one box, so SPR's
  snapping makes it that), else the best answer;
* ``truth``: always the annotation's answer.

Pairs whose sides are equal or whose IoU gap is under ``min_gap`` are dropped: they teach nothing.

    python -m spr_lightning.experiments.rec_pairs SFT_MODEL WORLD_DIR OUT_DIR [--queries 600] [--candidates 4]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from spr_lightning.evaluation import rec_box
from spr_lightning.metrics.accuracy import paired_iou

__all__ = ["CHOSEN_MODES", "answer_iou", "answer_rec_questions", "build_rec_pairs", "choose_pair", "main",
           "read_rec_questions"]

CHOSEN_MODES = ("best", "refined", "truth")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def answer_iou(box: Sequence[float], target: Sequence[float]) -> float:
    """IoU of an answer's box with the target box (``xyxy``), as REC's Acc@IoU computes it
    (:func:`~spr_lightning.metrics.accuracy.paired_iou`); 0 for an answer without a readable box (NaN)."""
    if any(math.isnan(v) for v in box):
        return 0.0
    pair = torch.tensor([list(box), list(target)], dtype=torch.float32)
    return float(paired_iou(pair[:1], pair[1:])[0])


def choose_pair(texts: Sequence[str], ious: Sequence[float], truth: str, chosen_mode: str,
                min_gap: float, rejected_min_iou: float = 0.0) -> tuple[str, float, str, float] | None:
    """``(chosen, chosen IoU, rejected, rejected IoU)`` of one question's sampled answers, or ``None`` when the pair
    would teach nothing (equal sides, a blank preferred side, or an IoU gap under ``min_gap``).

    The best-IoU answer is paired with the worst (the first of equals); ``chosen_mode`` (:data:`CHOSEN_MODES`)
    may put ``truth``, the annotation's answer, on the preferred side. ``rejected_min_iou`` > 0 makes *precision*
    pairs: the rejected side is the worst answer with at least that IoU (e.g. 0.5: both sides box the named object,
    only their tightness differs), and a question without one gives ``None``.
    """
    if chosen_mode not in CHOSEN_MODES:
        raise ValueError(f"chosen_mode must be one of {CHOSEN_MODES}, got {chosen_mode!r}")
    best = max(range(len(texts)), key=ious.__getitem__)
    eligible = [i for i in range(len(texts)) if ious[i] >= rejected_min_iou]
    if not eligible:
        return None
    worst = min(eligible, key=ious.__getitem__)
    chosen, chosen_iou = texts[best], ious[best]
    if chosen_mode == "truth" or (chosen_mode == "refined" and chosen_iou > 0.5):
        chosen, chosen_iou = truth, 1.0
    rejected, rejected_iou = texts[worst], ious[worst]
    if chosen == rejected or not chosen.strip() or chosen_iou - rejected_iou < min_gap:
        return None
    return chosen, chosen_iou, rejected, rejected_iou


def read_rec_questions(sft_file: str | Path) -> list[dict[str, Any]]:
    """The ``rec`` rows of an SFT JSONL file (``id``, ``image``, ``image_size``, ``prompt``, ``answer``, ``boxes``).

    Raises:
        ValueError: a row is not JSON or lacks a field, naming the file and line; or the file has no REC row.
    """
    rows = []
    with Path(sft_file).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{sft_file}:{number}: not JSON ({error})") from error
            if row.get("task") != "rec":
                continue
            missing = [k for k in ("id", "image", "image_size", "prompt", "answer", "boxes") if k not in row]
            if missing or not row.get("boxes"):
                raise ValueError(f"{sft_file}:{number}: REC row {row.get('id')!r} lacks {missing or ['boxes']}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{sft_file}: no REC question (task 'rec') to answer")
    return rows


def _summary(stats: dict[str, Any], chosen_mode: str, candidates: int) -> dict[str, Any]:
    def share(values: list[float], t: float) -> float:
        return sum(v >= t for v in values) / len(values) if values else 0.0

    return {
        "queries": stats["queries"], "pairs": stats["pairs"], "dropped": stats["queries"] - stats["pairs"],
        "chosen": chosen_mode, "candidates": candidates,
        "sampled_acc": {f"{t:g}": share(stats["ious"], t) for t in THRESHOLDS},
        "best_of_k_acc": {f"{t:g}": share(stats["best"], t) for t in THRESHOLDS},
        "chosen_iou_mean": statistics.fmean(stats["chosen"]) if stats["chosen"] else 0.0,
        "rejected_iou_mean": statistics.fmean(stats["rejected"]) if stats["rejected"] else 0.0,
    }  # fmt: skip


def answer_rec_questions(generator: Any, rows: Sequence[dict[str, Any]], world: Path, batch_size: int = 8,
                         progress: bool = True) -> Iterator[tuple[dict[str, Any], tuple[int, int], list[str]]]:
    """``(question row, image size, the generator's answer texts)`` for each of ``rows``, ``batch_size`` at a time.

    Raises:
        FileNotFoundError: a question's image is missing, naming the question and the path.
    """
    from PIL import Image
    from tqdm import tqdm

    for first in tqdm(range(0, len(rows), batch_size), desc="REC questions", unit="batch", disable=not progress):
        batch = rows[first:first + batch_size]
        images = []
        for row in batch:
            path = world / row["image"]
            if not path.is_file():
                raise FileNotFoundError(f"{world}: REC question {row['id']!r}: no image {path}")
            images.append(Image.open(path).convert("RGB"))
        sizes = [tuple(row["image_size"]) for row in batch]
        with torch.no_grad():
            answers = generator.generate([row["prompt"] for row in batch], images, sizes)
        yield from zip(batch, sizes, answers)


def build_rec_pairs(model: str, world: str | Path, out_dir: str | Path, *, queries: int = 600, candidates: int = 4,
                    chosen: str = "best", min_gap: float = 0.1, temperature: float = 1.0, batch_size: int = 8,
                    seed: int = 0, coord_format: str = "minigpt_v2", progress: bool = True,
                    rejected_min_iou: float = 0.0) -> dict[str, Any]:
    """Sample REC answers of ``model`` to ``queries`` of the world's training questions and write the pairs.

    Args:
        model: the policy (a ``from_pretrained`` folder, e.g. the SFT start).
        world: the quickstart's world folder (``sft_train.jsonl`` and the images it names).
        out_dir: where the ``pairs-*.tar`` shards and ``summary.json`` go.
        queries: questions answered (a seeded random subset; all when there are fewer).
        candidates: sampled answers per question.
        chosen: what the preferred side is (:data:`CHOSEN_MODES`).
        min_gap: smallest IoU gap between the two sides of a kept pair.
        temperature: sampling temperature (nucleus sampling off).
        batch_size: questions per ``generate`` call.
        seed: which questions, and the sampling.
        coord_format: the model's box format.
        progress: show a progress bar.
        rejected_min_iou: least IoU of the rejected side (:func:`choose_pair`; 0: the worst answer, as SPR pairs).

    Returns:
        the summary (also written to ``out_dir/summary.json``): questions, pairs, the sampled answers' and the
        best-of-k accuracy at IoU 0.5-0.9, the mean IoU of the chosen and of the rejected side.
    """
    from callbacks import ShardWriter
    from spr_lightning.generation import CandidateGenerator
    from spr_lightning.shards import SCHEMA_VERSION

    if chosen not in CHOSEN_MODES:
        raise ValueError(f"chosen must be one of {CHOSEN_MODES}, got {chosen!r}")
    world, out = Path(world), Path(out_dir)
    rows = read_rec_questions(world / "sft_train.jsonl")
    random.Random(seed).shuffle(rows)
    rows = rows[:queries]
    generator = CandidateGenerator(model, coord_format, num_candidates=candidates, temperature=temperature,
                                   top_p=1.0, max_new_tokens=24, seed=seed)
    generator.configure_model()
    writer = ShardWriter(out, prefix="pairs", samples_per_shard=1000).start()
    torch.manual_seed(seed)
    stats: dict[str, Any] = {"queries": 0, "pairs": 0, "ious": [], "best": [], "chosen": [], "rejected": []}
    for row, size, texts in answer_rec_questions(generator, rows, world, batch_size, progress):
        ious = [answer_iou(rec_box(generator.codec.decode(t, size)), row["boxes"][0]) for t in texts]
        stats["queries"] += 1
        stats["ious"].extend(ious)
        stats["best"].append(max(ious))
        pair = choose_pair(texts, ious, row["answer"], chosen, min_gap, rejected_min_iou)
        if pair is None:
            continue
        record = {
            "schema": SCHEMA_VERSION, "query_id": row["id"], "image_id": str(row["id"]).split("-")[0],
            "file_name": row["image"], "image_size": list(size), "region": list(row["boxes"][0]),
            "prompt": row["prompt"], "chosen": pair[0], "rejected": pair[2], "coord_format": coord_format,
            "scores": {"chosen": {"iou": pair[1]}, "rejected": {"iou": pair[3]}}, "task": "rec",
            "source": str(model),
        }  # fmt: skip
        writer.write_sample({"__key__": row["id"], "json": json.dumps(record).encode(),
                             "jpg": (world / row["image"]).read_bytes()})
        stats["pairs"] += 1
        stats["chosen"].append(pair[1])
        stats["rejected"].append(pair[3])
    writer.finish()
    summary = _summary(stats, chosen, candidates)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.experiments.rec_pairs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the policy: a from_pretrained folder (e.g. RUN/sft/model/final)")
    parser.add_argument("world", help="the quickstart's world folder (sft_train.jsonl, images/)")
    parser.add_argument("out", help="output folder of the pair shards")
    parser.add_argument("--queries", type=int, default=600, help="training questions answered")
    parser.add_argument("--candidates", type=int, default=4, help="sampled answers per question")
    parser.add_argument("--chosen", choices=CHOSEN_MODES, default="best", help="what the preferred side is")
    parser.add_argument("--min-gap", type=float, default=0.1, help="smallest IoU gap between chosen and rejected")
    parser.add_argument("--rejected-min-iou", type=float, default=0.0,
                        help="least IoU of the rejected answer (0.5: precision pairs, both sides on the named object)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coord-format", default="minigpt_v2")
    args = parser.parse_args(argv)
    summary = build_rec_pairs(args.model, args.world, args.out, queries=args.queries, candidates=args.candidates,
                              chosen=args.chosen, min_gap=args.min_gap, temperature=args.temperature,
                              batch_size=args.batch_size, seed=args.seed, coord_format=args.coord_format,
                              rejected_min_iou=args.rejected_min_iou)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

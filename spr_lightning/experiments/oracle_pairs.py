"""Preference pairs on region descriptions ranked by the annotations: an oracle reward, for a control.

SPR's reward must never read the annotations; this one does, to bound what any reward on the same candidates could
teach. Each candidate of a region (a generate stage's candidate shards) is scored by the share of its boxes that lie
on an annotated object its phrase names (:func:`~spr_lightning.experiments.pair_quality.answer_quality`), ties
broken by the mean best IoU; the best is paired with the worst and written as pair shards the DPO stage reads. The
chosen answer is kept as the policy wrote it (on-policy), or with ``refine`` snapped to the annotations as SPR's
refinement does (boxes matching one at IoU > 0.5 replaced by it, unmatched ones kept). Regions whose candidates all
tie make no pair. If DPO on these pairs makes the policy's descriptions better but not its REC answers, no reward
on descriptions can lift REC on that policy.

    python -m spr_lightning.experiments.oracle_pairs CANDIDATES_DIR INSTANCES_JSON OUT_DIR [--refine]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spr_lightning.coords import get_codec
from spr_lightning.experiments.pair_quality import answer_quality, load_objects, pair_samples
from spr_lightning.shards import SCHEMA_VERSION, ShardFormatError

__all__ = ["build_oracle_pairs", "main", "oracle_pair", "oracle_scores"]


def oracle_scores(record: Mapping[str, Any], objects: Sequence[tuple[str, list[float]]]) -> list[float]:
    """Each candidate's share of boxes named right, plus 1e-3 x its mean best IoU (the tie-break)."""
    size = tuple(record["image_size"])
    scores = []
    for text in record["candidates"]:
        quality = answer_quality(text, list(objects), size, record["coord_format"])
        scores.append(quality.named + 1e-3 * quality.mean_iou)
    return scores


def oracle_pair(record: Mapping[str, Any], objects: Sequence[tuple[str, list[float]]]
                ) -> tuple[int, int, list[float]] | None:
    """``(best, worst, scores)`` of a region's candidates; ``None`` when they all tie (or the two texts are equal)."""
    scores = oracle_scores(record, objects)
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst] or record["candidates"][best] == record["candidates"][worst]:
        return None
    return best, worst, scores


def build_oracle_pairs(candidates_dir: str | Path, annotations: str | Path, out_dir: str | Path,
                       refine: bool = False) -> dict[str, float]:
    """Write the oracle's pairs of every region in ``candidates_dir`` to ``out_dir``.

    Returns:
        ``{"queries", "pairs", "ties", "chosen_oracle", "rejected_oracle"}`` (the last two: mean oracle score of each
        side, i.e. the share of boxes named right); also written to ``out_dir/summary.json``.

    Raises:
        spr_lightning.shards.ShardFormatError: a candidate's image is not in ``annotations``, naming the query.
    """
    from callbacks import ShardWriter
    from datamodules.preference import expand_urls
    from spr_lightning.scoring.refine import refine_description

    objects = load_objects(annotations)
    writer = ShardWriter(out_dir, prefix="pairs", samples_per_shard=1000).start()
    queries, ties, chosen_scores, rejected_scores = 0, 0, [], []
    for shard, key, members in pair_samples(expand_urls(str(candidates_dir))):
        record = json.loads(members["json"])
        queries += 1
        if record["image_id"] not in objects:
            raise ShardFormatError(f"{shard}: sample {key!r}: image {record['image_id']!r} is not in {annotations}")
        picked = oracle_pair(record, objects[record["image_id"]])
        if picked is None:
            ties += 1
            continue
        best, worst, scores = picked
        chosen = record["candidates"][best]
        if refine:
            annotated = [box for _, box in objects[record["image_id"]]]
            chosen = refine_description(chosen, get_codec(record["coord_format"]), tuple(record["image_size"]),
                                        annotated, anno_boxes=annotated, region=record["region"],
                                        keep_unmatched=True).text
            if chosen == record["candidates"][worst]:
                ties += 1
                continue
        pair = {name: record[name] for name in ("query_id", "image_id", "image_size", "region", "prompt",
                                                 "coord_format")}
        pair.update(schema=SCHEMA_VERSION, chosen=chosen, rejected=record["candidates"][worst],
                    chosen_raw=record["candidates"][best],
                    scores={"chosen": {"total": scores[best]}, "rejected": {"total": scores[worst]}})
        writer.write_sample({"__key__": key, "json": json.dumps(pair).encode(), "jpg": members["jpg"]})
        chosen_scores.append(scores[best])
        rejected_scores.append(scores[worst])
    writer.finish()
    summary = {"queries": float(queries), "pairs": float(len(chosen_scores)), "ties": float(ties),
               "chosen_oracle": statistics.fmean(chosen_scores) if chosen_scores else 0.0,
               "rejected_oracle": statistics.fmean(rejected_scores) if rejected_scores else 0.0}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.experiments.oracle_pairs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("candidates", help="a generate stage's candidates folder")
    parser.add_argument("instances", help="COCO instances JSON of the images the candidates describe")
    parser.add_argument("out", help="output folder of the pair shards")
    parser.add_argument("--refine", action="store_true", help="snap the chosen answer's boxes to the annotations")
    args = parser.parse_args(argv)
    summary = build_oracle_pairs(args.candidates, args.instances, args.out, refine=args.refine)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

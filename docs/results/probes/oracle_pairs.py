"""One-off probe (docs/results.md, "Pairs, displacement and an oracle reward"): could DPO lift grounding on this
start if the reward were right?

Builds preference pairs from a generate stage's candidate shards with an *oracle* reward that reads the annotations
(what SPR's reward must never do): each candidate's share of boxes that lie on an object its phrase names
(:func:`spr_lightning.experiments.pair_quality.answer_quality`, ties broken by mean best IoU); best vs worst per
region, written as pair shards that the DPO stage reads. The chosen answer is kept as generated, or with
``--refine`` refined as the quickstart's score stage does (boxes matching an annotation at IoU > 0.5 snapped to it,
unmatched ones kept), with the image's annotations as ``B_gt``. Comparing DPO on these with
DPO on SPR's own pairs separates "the reward is too noisy" from "preferences on region descriptions do not move
REC on this policy". Run by hand, not part of the package:

    python docs/results/probes/oracle_pairs.py CANDIDATES_DIR INSTANCES_JSON OUT_DIR [--refine]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from callbacks import ShardWriter
from datamodules.preference import expand_urls
from spr_lightning.coords import get_codec
from spr_lightning.experiments.pair_quality import answer_quality, load_objects, pair_samples
from spr_lightning.scoring.refine import refine_description
from spr_lightning.shards import SCHEMA_VERSION


def oracle_pair(record: dict, objects: list) -> tuple[int, int, list[float]] | None:
    """``(best, worst, scores)`` by named-right share then mean IoU; ``None`` when every candidate ties."""
    size = tuple(record["image_size"])
    scores = []
    for text in record["candidates"]:
        quality = answer_quality(text, objects, size, record["coord_format"])
        scores.append(quality.named + 1e-3 * quality.mean_iou)
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst] or record["candidates"][best] == record["candidates"][worst]:
        return None
    return best, worst, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidates", help="a generate stage's candidates folder")
    parser.add_argument("instances", help="COCO instances JSON of the images the candidates describe")
    parser.add_argument("out", type=Path)
    parser.add_argument("--refine", action="store_true", help="snap the chosen answer's boxes to the annotations")
    args = parser.parse_args()
    objects = load_objects(args.instances)
    writer = ShardWriter(args.out, prefix="pairs", samples_per_shard=10000).start()
    ties = 0
    for _, key, members in pair_samples(expand_urls(args.candidates)):
        record = json.loads(members["json"])
        picked = oracle_pair(record, objects[record["image_id"]])
        if picked is None:
            ties += 1
            continue
        best, worst, scores = picked
        chosen = record["candidates"][best]
        if args.refine:
            annotated = [box for _, box in objects[record["image_id"]]]
            chosen = refine_description(chosen, get_codec(record["coord_format"]), tuple(record["image_size"]),
                                        annotated, anno_boxes=annotated, region=record["region"],
                                        keep_unmatched=True).text
            if chosen == record["candidates"][worst]:
                ties += 1
                continue
        pair = {field: record[field] for field in ("query_id", "image_id", "image_size", "region", "prompt",
                                                    "coord_format")}
        pair.update(schema=SCHEMA_VERSION, chosen=chosen,
                    rejected=record["candidates"][worst], chosen_raw=record["candidates"][best],
                    scores={"chosen": {"total": scores[best]}, "rejected": {"total": scores[worst]}})
        writer.write_sample({"__key__": key, "json": json.dumps(pair).encode(), "jpg": members["jpg"]})
    writer.finish()
    print(f"{writer.samples_written} oracle pairs, {ties} regions whose candidates all tie; {args.out}")

if __name__ == "__main__":
    main()

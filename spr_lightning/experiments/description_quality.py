"""How good are a policy's grounded region descriptions on held-out regions? SPR's own task, against the annotations.

SPR trains on region descriptions and the issue-#11 experiment scores REC and phrase grounding. When those do not
move, this asks the prior question: did DPO make the descriptions themselves better? It reads candidate shards (the
generate stage's output; for an evaluation, greedy answers of the model to the *test* split's regions) and scores
each region's first answer against the image's annotations:

* ``boxes``: boxes written per description;
* ``on_object``: share of those boxes with IoU >= 0.5 on an annotated object;
* ``named``: share whose phrase also names that object's category ("named right", as in
  :mod:`~spr_lightning.experiments.pair_quality`);
* ``mean_iou``: mean over boxes of the best IoU with an annotated object;
* ``names_region``: share of the phrases naming an object of the queried region, boxes aside
  (:func:`~spr_lightning.experiments.reward_audit.names_region`).

    python -m spr_lightning.experiments.description_quality CANDIDATES_DIR ANNOTATIONS_JSON [--out F.json]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from spr_lightning.experiments._probe_cli import probe_parser, write_result
from spr_lightning.experiments.pair_quality import answer_quality, load_objects
from spr_lightning.experiments.reward_audit import names_region, read_candidates
from spr_lightning.shards import ShardFormatError

__all__ = ["DESCRIPTION_METRICS", "description_quality", "format_description_quality", "main"]

#: The per-region means :func:`description_quality` reports (besides ``regions``).
DESCRIPTION_METRICS = ("boxes", "on_object", "named", "mean_iou", "names_region")


def description_quality(candidates_dir: str | Path, annotations: str | Path, coord_format: str = "minigpt_v2",
                        iou_threshold: float = 0.5) -> dict[str, float]:
    """Means over regions of :data:`DESCRIPTION_METRICS` for each region's first candidate; ``regions`` counts them.

    Raises:
        spr_lightning.shards.ShardFormatError: a record's image is not in ``annotations`` or its candidates are
            empty, naming the query.
    """
    objects = load_objects(annotations)
    rows: list[dict[str, float]] = []
    for query, record in read_candidates(candidates_dir).items():
        if not record["candidates"]:
            raise ShardFormatError(f"{candidates_dir}: query {query!r} has no candidate")
        if record["image_id"] not in objects:
            raise ShardFormatError(f"{candidates_dir}: query {query!r}: image {record['image_id']!r} is not in "
                                   f"{annotations}")
        text, size = record["candidates"][0], tuple(record["image_size"])
        quality = answer_quality(text, objects[record["image_id"]], size, coord_format, iou_threshold)
        labels = [o.get("label") for o in record.get("objects", []) if o.get("label")]
        rows.append({"boxes": float(quality.boxes), "on_object": quality.on_object, "named": quality.named,
                     "mean_iou": quality.mean_iou, "names_region": names_region(text, labels, size, coord_format)})
    summary: dict[str, float] = {"regions": float(len(rows))}
    for key in DESCRIPTION_METRICS:
        summary[key] = statistics.fmean(r[key] for r in rows) if rows else float("nan")
    return summary


def format_description_quality(summary: dict[str, Any]) -> str:
    """One line per metric, for the terminal."""
    lines = [f"regions: {int(summary['regions'])}"]
    lines += [f"{key}: {summary[key]:.3f}" for key in DESCRIPTION_METRICS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = probe_parser("spr_lightning.experiments.description_quality", __doc__)
    parser.add_argument("candidates_dir", help="folder of candidate shards (a generate stage's output)")
    parser.add_argument("annotations", help="COCO instances JSON of their images")
    parser.add_argument("--coord-format", default="minigpt_v2", help="how the answers write boxes")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a box to be on an object")
    args = parser.parse_args(argv)
    summary = description_quality(args.candidates_dir, args.annotations, args.coord_format, args.iou_threshold)
    write_result(args.out, summary)
    print(format_description_quality(summary))
    return summary


if __name__ == "__main__":
    main()

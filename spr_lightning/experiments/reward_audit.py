"""Does the reward rank what it should? Every candidate's S_sem and S_loc against the annotations.

:mod:`~spr_lightning.experiments.pair_quality` judges the two answers DPO sees; this looks one step earlier, at all
candidates of each query (the pair records keep their ``all_scores``, the candidate shards their texts), and asks,
per query and then averaged:

* **spread**: the standard deviation of S_sem and of S_loc over the query's candidates. Eq. 3 mixes raw scores,
  so a score whose spread is much larger decides the ranking whatever λ says (SPR's α = 5 was set to "balance the
  range" of *its* CLIP's similarities);
* **agreement with the truth** (Spearman ρ over the query's candidates, average ranks for ties) of each score with
  ``on_object`` (the share of the candidate's boxes with IoU >= 0.5 on an annotated object) and with
  ``names_region`` (the share of its phrases naming an object of the region: the description is right, boxes
  aside);
* **pairs under other λ**: for each λ the pair :func:`~spr_lightning.rewarding.select_pair` would make from the
  same scores, and how often its chosen answer has more / fewer boxes on objects than its rejected one.

    python -m spr_lightning.experiments.reward_audit PAIRS_DIR CANDIDATES_DIR ANNOTATIONS_JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spr_lightning.coords import get_codec
from spr_lightning.experiments.pair_quality import answer_quality, iter_pairs, iter_records, load_objects
from spr_lightning.rewarding import combine_scores, select_pair
from spr_lightning.shards import ShardFormatError

__all__ = ["LAMBDAS", "audit_lambdas", "average_ranks", "format_audit", "main", "names_region", "read_candidates",
           "reward_audit", "spearman"]

LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 0, tied values sharing the mean of their ranks (as Spearman's ρ needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's ρ of two equally long sequences; ``None`` when either is constant (ρ is undefined)."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    da, db = [x - ma for x in ra], [y - mb for y in rb]
    va, vb = sum(x * x for x in da), sum(y * y for y in db)
    if va == 0 or vb == 0:
        return None
    return sum(x * y for x, y in zip(da, db)) / (va * vb) ** 0.5


def names_region(text: str, labels: Sequence[str], image_size: tuple[int, int], coord_format: str) -> float:
    """Share of ``text``'s grounded phrases that contain the label of an object of the region (0 without any)."""
    phrases = [(g.phrase or "").lower() for g in get_codec(coord_format).decode(text, image_size)]
    wanted = [label.lower() for label in labels]
    return sum(any(label in phrase for label in wanted) for phrase in phrases) / len(phrases) if phrases else 0.0


def read_candidates(candidates_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{query_id: candidate record}`` of the complete candidate shards in ``candidates_dir``."""
    records = {}
    for shard, key, record in iter_records(candidates_dir, "candidate"):
        if not isinstance(record.get("candidates"), list):
            raise ShardFormatError(f"{shard}: sample {key!r} has no 'candidates' list (not a candidate shard?)")
        records[record.get("query_id", key)] = record
    return records


def _query_rows(pairs_dir: str | Path, candidates: Mapping[str, Mapping[str, Any]],
                objects: Mapping[int, list[tuple[str, list[float]]]], coord_format: str,
                iou_threshold: float) -> list[dict[str, list[float]]]:
    """Per query: the candidates' texts, scores and truth."""
    rows = []
    for pair in iter_pairs(pairs_dir):
        query = pair.get("query_id")
        scores = pair.get("all_scores")
        if not isinstance(scores, list) or any("sem" not in s or "loc" not in s for s in scores):
            raise ShardFormatError(f"pair {query}: no 'all_scores' with 'sem' and 'loc' for every candidate")
        if query not in candidates:
            raise KeyError(f"pair {query}: no such query in the candidate shards")
        texts = candidates[query]["candidates"]
        if len(texts) != len(scores):
            raise ShardFormatError(f"pair {query}: {len(scores)} scores for {len(texts)} candidates")
        image_id, size = pair["image_id"], tuple(pair["image_size"])
        if image_id not in objects:
            raise KeyError(f"pair {query}: image_id {image_id} has no objects in the annotations")
        labels = [o["label"] for o in candidates[query].get("objects", [])] or [n for n, _ in objects[image_id]]
        rows.append({
            "texts": texts, "sem": [float(s["sem"]) for s in scores], "loc": [float(s["loc"]) for s in scores],
            "on_object": [answer_quality(t, objects[image_id], size, coord_format, iou_threshold).on_object
                          for t in texts],
            "names_region": [names_region(t, labels, size, coord_format) for t in texts],
        })  # fmt: skip
    return rows


def reward_audit(pairs_dir: str | Path, candidates_dir: str | Path, annotations: str | Path,
                 coord_format: str = "minigpt_v2", lambdas: Sequence[float] = LAMBDAS,
                 iou_threshold: float = 0.5) -> dict[str, float]:
    """The audit described in the module docstring, averaged over the queries of ``pairs_dir``.

    Keys: ``queries``; ``sem_spread``, ``loc_spread``; ``rho_<score>_<truth>`` for score in sem/loc and truth in
    on_object/names_region (mean over queries where ρ is defined); ``on_object_mean`` (a random candidate) and
    ``on_object_best`` (the best candidate: what a perfect ranking could choose); per λ ``lam<λ>_pairs`` (share of
    queries that make a pair), ``lam<λ>_better``, ``lam<λ>_worse`` (shares of those pairs) and ``lam<λ>_gap`` (mean
    chosen minus rejected ``on_object``).

    Raises:
        FileNotFoundError: no shards in ``pairs_dir`` or ``candidates_dir``.
        ShardFormatError / KeyError: a pair without per-candidate scores, or one that does not belong to the
            candidates / annotations given (the error names the query).
    """
    rows = _query_rows(pairs_dir, read_candidates(candidates_dir), load_objects(annotations), coord_format,
                       iou_threshold)
    summary: dict[str, float] = {"queries": float(len(rows))}
    if not rows:
        return summary
    for score in ("sem", "loc"):
        summary[f"{score}_spread"] = statistics.fmean(statistics.pstdev(r[score]) for r in rows)
        for truth in ("on_object", "names_region"):
            rhos = [rho for r in rows if (rho := spearman(r[score], r[truth])) is not None]
            summary[f"rho_{score}_{truth}"] = statistics.fmean(rhos) if rhos else float("nan")
    summary["on_object_mean"] = statistics.fmean(statistics.fmean(r["on_object"]) for r in rows)
    summary["on_object_best"] = statistics.fmean(max(r["on_object"]) for r in rows)
    for lam in lambdas:
        gaps = []
        for r in rows:
            pair = select_pair([combine_scores(s, loc, lam) for s, loc in zip(r["sem"], r["loc"])], r["texts"])
            if pair is not None:
                gaps.append(r["on_object"][pair[0]] - r["on_object"][pair[1]])
        summary[f"lam{lam:g}_pairs"] = len(gaps) / len(rows)
        summary[f"lam{lam:g}_better"] = statistics.fmean(g > 0 for g in gaps) if gaps else 0.0
        summary[f"lam{lam:g}_worse"] = statistics.fmean(g < 0 for g in gaps) if gaps else 0.0
        summary[f"lam{lam:g}_gap"] = statistics.fmean(gaps) if gaps else 0.0
    return summary


def audit_lambdas(summary: Mapping[str, float]) -> list[float]:
    """The λ values a :func:`reward_audit` summary holds, in order."""
    return [float(k[3:-6]) for k in summary if k.startswith("lam") and k.endswith("_pairs")]


def format_audit(summary: Mapping[str, float]) -> str:
    """Markdown: the scores' spreads and agreement with the truth, then the pairs each λ would make."""
    if not summary.get("queries"):
        return "No queries to audit."
    lines = ["| score | spread (std over a query's candidates) | ρ with boxes on objects | ρ with naming the region |",
             "|---|---|---|---|"]
    for score, name in (("sem", "S_sem"), ("loc", "S_loc")):
        lines.append(f"| {name} | {summary[f'{score}_spread']:.3f} | {summary[f'rho_{score}_on_object']:+.3f} | "
                     f"{summary[f'rho_{score}_names_region']:+.3f} |")
    lines += ["", f"{int(summary['queries'])} queries; boxes on objects: {100 * summary['on_object_mean']:.1f}% for "
              f"a random candidate, {100 * summary['on_object_best']:.1f}% for the best one.", "",
              "| λ | queries paired | chosen has more boxes on objects | fewer | mean difference (points) |",
              "|---|---|---|---|---|"]
    for lam in audit_lambdas(summary):
        key = f"lam{lam:g}"
        lines.append(f"| {lam:g} | {100 * summary[f'{key}_pairs']:.1f}% | {100 * summary[f'{key}_better']:.1f}% | "
                     f"{100 * summary[f'{key}_worse']:.1f}% | {100 * summary[f'{key}_gap']:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.experiments.reward_audit",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("pairs_dir", help="folder of pair shards (the score stage's output, with all_scores)")
    parser.add_argument("candidates_dir", help="folder of the candidate shards those pairs were scored from")
    parser.add_argument("annotations", help="COCO instances JSON of the images")
    parser.add_argument("--coord-format", default="minigpt_v2", help="how the answers write boxes")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a box to be on an object")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    summary = reward_audit(args.pairs_dir, args.candidates_dir, args.annotations, args.coord_format,
                           iou_threshold=args.iou_threshold)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(format_audit(summary))
    return summary


if __name__ == "__main__":
    main()

"""How good are the preference pairs really? Chosen vs rejected answers checked against the annotations.

SPR's reward (CLIP + Algorithm 1) never sees the ground truth; whether DPO can learn anything depends on how often
the chosen answer is in fact better grounded than the rejected one. On a world with annotations that is measurable:
every box of an answer is matched to the annotated object it overlaps most, and counted

* ``on_object``: IoU >= ``iou_threshold`` with some annotated object (the box is *somewhere* right);
* ``named``: on an object *and* its phrase contains that object's category name (``"small red circle"``): the box
  is right for what the answer says it is.

Per pair side (``chosen_raw``: as generated, ``chosen``: after refinement, ``rejected``) the mean boxes per answer,
the share of ``on_object`` and ``named`` boxes and the mean best IoU; and how often the chosen answer has a larger
(``chosen_better``) or smaller (``chosen_worse``) share of ``named`` boxes than the rejected one.

    python -m spr_lightning.experiments.pair_quality PAIRS_DIR ANNOTATIONS_JSON [--coord-format minigpt_v2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from spr_lightning.coords import get_codec
from spr_lightning.shards import ShardFormatError, tar_samples

__all__ = ["SIDES", "AnswerQuality", "answer_quality", "format_quality", "iter_pairs", "iter_records", "load_objects",
           "main", "pair_quality", "pair_samples"]

SIDES = ("chosen_raw", "chosen", "rejected")


@dataclass(frozen=True)
class AnswerQuality:
    """One answer against its image's annotations (shares are 0 for an answer without boxes)."""

    boxes: int
    on_object: float
    named: float
    mean_iou: float


def load_objects(annotations: str | Path) -> dict[int, list[tuple[str, list[float]]]]:
    """COCO instances file -> ``{image_id: [(category name, [x1, y1, x2, y2]), ...]}``."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, list[tuple[str, list[float]]]] = {}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        objects.setdefault(ann["image_id"], []).append((names[ann["category_id"]], [x, y, x + w, y + h]))
    return objects


def answer_quality(text: str, objects: list[tuple[str, list[float]]], image_size: tuple[int, int],
                   coord_format: str = "minigpt_v2", iou_threshold: float = 0.5) -> AnswerQuality:
    """Decode ``text``'s boxes and match each to the annotated object it overlaps most."""
    groundings = get_codec(coord_format).decode(text, image_size)
    if not groundings or not objects:
        return AnswerQuality(len(groundings), 0.0, 0.0, 0.0)
    iou = box_iou(torch.tensor([list(g.xyxy) for g in groundings], dtype=torch.float64),
                  torch.tensor([box for _, box in objects], dtype=torch.float64))
    best, index = iou.max(dim=1)
    on_object = best >= iou_threshold
    named = [bool(hit) and objects[int(j)][0].lower() in (g.phrase or "").lower()
             for g, hit, j in zip(groundings, on_object.tolist(), index.tolist())]
    return AnswerQuality(len(groundings), float(on_object.double().mean()), sum(named) / len(named),
                         float(best.mean()))


def pair_samples(shards: Iterable[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """``(shard, key, {extension: bytes})`` of every pair in ``shards`` (complete shards, e.g. from
    :func:`datamodules.preference.expand_urls`), each key once (a re-made shard repeats keys), as DPO reads them;
    a sample without ``json`` is a :class:`~spr_lightning.shards.ShardFormatError`."""
    seen: set[str] = set()
    for shard in shards:
        for key, members in tar_samples(shard):
            if key in seen:
                continue
            if "json" not in members:
                raise ShardFormatError(f"{shard}: sample {key!r} has no json")
            seen.add(key)
            yield shard, key, members


def iter_records(folder: str | Path, kind: str = "pair") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(shard, key, JSON record)`` of every sample in the complete shards of ``folder``, each key once, as DPO
    reads them; ``kind`` ("pair", "candidate") names the shards in the error when there are none."""
    from datamodules.preference import expand_urls

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{kind} shard folder {folder} does not exist")
    try:
        shards = expand_urls(str(folder))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no *.tar {kind} shards in {folder}") from err
    for shard, key, members in pair_samples(shards):
        yield shard, key, json.loads(members["json"])


def iter_pairs(pairs_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON record of every pair in the complete shards of ``pairs_dir``, each key once, as DPO reads them."""
    for _, _, record in iter_records(pairs_dir, "pair"):
        yield record


def pair_quality(pairs_dir: str | Path, annotations: str | Path, coord_format: str = "minigpt_v2",
                 iou_threshold: float = 0.5) -> dict[str, float]:
    """Mean :class:`AnswerQuality` per side and the chosen-better/worse shares over all pairs of ``pairs_dir``.

    Keys: ``pairs``, ``<side>_boxes``, ``<side>_on_object``, ``<side>_named``, ``<side>_mean_iou`` for each side in
    :data:`SIDES`, ``chosen_better`` and ``chosen_worse``.

    Raises:
        KeyError: a pair's image is not in ``annotations`` (the pairs come from another world).
    """
    objects = load_objects(annotations)
    rows: list[dict[str, AnswerQuality]] = []
    for pair in iter_pairs(pairs_dir):
        image_id = pair["image_id"]
        if image_id not in objects:
            raise KeyError(f"pair {pair.get('query_id')}: image_id {image_id} has no objects in {annotations}")
        size = tuple(pair["image_size"])
        texts = {"chosen_raw": pair.get("chosen_raw", pair["chosen"]), "chosen": pair["chosen"],
                 "rejected": pair["rejected"]}
        rows.append({side: answer_quality(texts[side], objects[image_id], size, coord_format, iou_threshold)
                     for side in SIDES})
    summary: dict[str, float] = {"pairs": float(len(rows))}
    if not rows:
        return summary
    for side in SIDES:
        for name in ("boxes", "on_object", "named", "mean_iou"):
            summary[f"{side}_{name}"] = statistics.fmean(getattr(r[side], name) for r in rows)
    summary["chosen_better"] = statistics.fmean(r["chosen"].named > r["rejected"].named for r in rows)
    summary["chosen_worse"] = statistics.fmean(r["chosen"].named < r["rejected"].named for r in rows)
    return summary


def format_quality(summary: Mapping[str, float]) -> str:
    """A small Markdown table of :func:`pair_quality`'s result."""
    lines = ["| answer | boxes | on an object | named right | mean best IoU |", "|---|---|---|---|---|"]
    for side in SIDES:
        if f"{side}_boxes" in summary:
            lines.append(f"| {side} | {summary[f'{side}_boxes']:.2f} | {100 * summary[f'{side}_on_object']:.1f}% | "
                         f"{100 * summary[f'{side}_named']:.1f}% | {summary[f'{side}_mean_iou']:.3f} |")
    if "chosen_better" in summary:
        lines.append(f"\n{int(summary['pairs'])} pairs; chosen names more boxes right than rejected in "
                     f"{100 * summary['chosen_better']:.1f}%, fewer in {100 * summary['chosen_worse']:.1f}%.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.experiments.pair_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("pairs_dir", help="folder of pair shards (the score stage's output)")
    parser.add_argument("annotations", help="COCO instances JSON of the images the pairs were made from")
    parser.add_argument("--coord-format", default="minigpt_v2", help="how the answers write boxes")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a box to be on an object")
    args = parser.parse_args(argv)
    summary = pair_quality(args.pairs_dir, args.annotations, args.coord_format, args.iou_threshold)
    print(format_quality(summary))
    return summary


if __name__ == "__main__":
    main()

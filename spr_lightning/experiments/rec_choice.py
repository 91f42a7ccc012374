"""Which object does a REC answer pick? Its attributes against the referred object's, and against chance.

Acc@0.5 says how often the box is on the referred object; it does not say *why* a model misses. On SPR-Shapes every
object has a size, colour and shape, so a miss can be read: when the predicted box lies on *some* object (IoU >=
``iou_threshold``), does that object share the referred object's size, colour, shape? A model that matches the
expression's words to the image picks objects that agree with them far more often than an object drawn at random
from the same image does (``chance``: the share of the image's objects with the referred object's value, averaged
over the same predictions). A model that has learned only where objects are, or only their size, sits at chance for
the rest: the SPR-Shapes start of docs/results.md picks the right size 79% of the time (chance 55%) and the right
colour 24% (chance 20%).

    python -m spr_lightning.experiments.rec_choice PREDICTIONS_JSONL REFCOCO_JSON INSTANCES_JSON [--out F]

``PREDICTIONS_JSONL`` is what ``validate`` writes for a REC split (``predictions-rank0.jsonl``: ``key``,
``pred_box``); ``REFCOCO_JSON`` and ``INSTANCES_JSON`` are the world's ``annotations/refcoco_shapes.json`` and the
split's ``annotations/instances_<split>.json`` (annotations carry ``attributes``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from spr_lightning.experiments._probe_cli import probe_parser, read_predictions, write_result

__all__ = ["ATTRIBUTES", "format_choice", "load_world_objects", "main", "rec_choice"]

ATTRIBUTES = ("size", "color", "shape")


def load_world_objects(refcoco: str | Path, instances: str | Path) -> tuple[dict[str, dict[str, Any]],
                                                                            dict[int, list[dict[str, Any]]]]:
    """``({ref id: ref}, {image id: [{"id", "box": [x1, y1, x2, y2], "attributes"}, ...]})`` of an SPR-Shapes world."""
    refs = {str(ref["id"]): ref for ref in json.loads(Path(refcoco).read_text(encoding="utf-8"))}
    data = json.loads(Path(instances).read_text(encoding="utf-8"))
    objects: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        if "attributes" not in ann:
            raise ValueError(f"{instances}: annotation {ann.get('id')} has no 'attributes' (not an SPR-Shapes file?)")
        x, y, w, h = ann["bbox"]
        objects.setdefault(ann["image_id"], []).append(
            {"id": ann["id"], "box": [x, y, x + w, y + h], "attributes": ann["attributes"]})
    return refs, objects


def rec_choice(predictions: Iterable[dict[str, Any]], refs: dict[str, dict[str, Any]],
               objects: dict[int, list[dict[str, Any]]], iou_threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Per expression kind (``attribute``, ``relation``, ... and ``all``): how picked objects agree with targets.

    Returns:
        ``{kind: {"n", "on_object", "right", "<attr>", "<attr>_chance", ...}}``: ``n`` predictions; ``on_object``
        the share on some object; ``right`` the share on the referred object; for each of :data:`ATTRIBUTES` the
        share of *on-object* picks whose object has the referred object's value, and its ``_chance``.

    Raises:
        KeyError: a prediction's key names no ref of ``refs`` (wrong REFCOCO file for these predictions).
    """
    counts: dict[str, Counter] = {}
    for prediction in predictions:
        ref_id, _, sentence = str(prediction["key"]).rpartition("-")
        if ref_id not in refs:
            raise KeyError(f"prediction {prediction['key']!r}: no ref {ref_id!r} in the REC annotations")
        ref = refs[ref_id]
        kinds = ref.get("kinds") or []
        kind = kinds[int(sentence)] if sentence.isdigit() and int(sentence) < len(kinds) else "unknown"
        scene = objects.get(ref["image_id"], [])
        target = next((o for o in scene if o["id"] == ref["ann_id"]), None)
        if target is None:
            raise KeyError(f"prediction {prediction['key']!r}: object {ref['ann_id']} not in the instances file")
        pick: Counter = Counter({"n": 1})
        box = prediction.get("pred_box")
        if box is not None:
            ious = box_iou(torch.tensor([box], dtype=torch.float64),
                           torch.tensor([o["box"] for o in scene], dtype=torch.float64))[0]
            if float(ious.max()) >= iou_threshold:
                picked = scene[int(ious.argmax())]
                pick.update(on_object=1, right=int(picked is target))
                for attribute in ATTRIBUTES:
                    value = target["attributes"][attribute]
                    pick[attribute] += int(picked["attributes"][attribute] == value)
                    pick[f"{attribute}_chance"] += sum(o["attributes"][attribute] == value for o in scene) / len(scene)
        for name in (kind, "all"):
            counts.setdefault(name, Counter()).update(pick)
    result = {}
    for kind, count in counts.items():
        on = max(count["on_object"], 1)
        n = count["n"]
        row = {"n": float(n), "on_object": count["on_object"] / n, "right": count["right"] / n}
        for attribute in ATTRIBUTES:
            row[attribute] = count[attribute] / on
            row[f"{attribute}_chance"] = count[f"{attribute}_chance"] / on
        result[kind] = row
    return result


def format_choice(result: dict[str, dict[str, float]]) -> str:
    """A small table: one row per expression kind."""
    header = "  ".join(f"{a:>15}" for a in ATTRIBUTES)
    lines = [f"kind        n     on object  right   {header}   (picked vs chance)"]
    for kind, row in sorted(result.items(), key=lambda item: item[0] == "all"):
        cells = "  ".join(f"{100 * row[a]:6.1f} ({100 * row[a + '_chance']:4.1f})" for a in ATTRIBUTES)
        share = f"{100 * row['on_object']:8.1f}%  {100 * row['right']:5.1f}%"
        lines.append(f"{kind:10} {int(row['n']):5d}  {share}  {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = probe_parser("spr_lightning.experiments.rec_choice", __doc__)
    parser.add_argument("predictions", help="REC predictions JSONL written by validate (predictions-rank0.jsonl)")
    parser.add_argument("refcoco", help="the world's annotations/refcoco_shapes.json")
    parser.add_argument("instances", help="the split's annotations/instances_<split>.json")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a box to be on an object")
    args = parser.parse_args(argv)
    refs, objects = load_world_objects(args.refcoco, args.instances)
    result = rec_choice(read_predictions(args.predictions), refs, objects, iou_threshold=args.iou_threshold)
    print(format_choice(result))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()

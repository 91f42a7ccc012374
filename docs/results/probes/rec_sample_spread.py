"""Where a start's sampled REC answers land: which object (selection) and how precisely (precision).

Why: on-task REC preference pairs (the ``rec_dpo`` control) give only about +2 points although the best of 8
sampled answers reaches IoU 0.5 for ~77% of the questions against ~42% for the greedy answer. That headroom can be
of two kinds. *Selection*: the samples spread over several objects and one of them happens to be the named one, which
the policy cannot tell apart. *Precision*: the samples
land on the named object and one of them is boxed more tightly, which is what Acc@0.75 needs.

For the REC questions of a world's split (``sft_<split>.jsonl``), the model answers greedily once and samples ``K``
answers at temperature 1; each answer's box is assigned to the annotated object it overlaps most (IoU >= 0.5) or to
none. Prints, over questions: the per-question share of samples on the named object (how often the policy is sure,
unsure or wrong), the distinct objects the samples land on, and the best-of-K headroom at IoU 0.5 and 0.75 split
into questions where the greedy answer is on another object or none (selection) and where it is on the named object
but below 0.75 (precision); and, for greedy answers on the named object, the signed box errors (a shared bias would
be one correction for every box; unbiased scatter has to be corrected box by box).

    python docs/results/probes/rec_sample_spread.py MODEL WORLD [--split test] [--questions 400] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import torch

from spr_lightning.evaluation import rec_box
from spr_lightning.experiments.rec_pairs import answer_iou, answer_rec_questions, read_rec_questions
from spr_lightning.generation import CandidateGenerator


def image_objects(annotations: Path) -> dict[str, list[list[float]]]:
    """Image file name (as the SFT rows write it, under ``images/``) -> its objects' xyxy boxes."""
    data = json.loads(annotations.read_text(encoding="utf-8"))
    names = {image["id"]: f"images/{image['file_name']}" for image in data["images"]}
    objects: dict[str, list[list[float]]] = {name: [] for name in names.values()}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        objects[names[ann["image_id"]]].append([x, y, x + w, y + h])
    return objects


def landing(box: list[float], objects: list[list[float]]) -> int | None:
    """Index of the object the box overlaps most at IoU >= 0.5, or None."""
    ious = [answer_iou(box, obj) for obj in objects]
    best = max(range(len(ious)), key=ious.__getitem__, default=None)
    return best if best is not None and ious[best] >= 0.5 else None


def box_error(box: list[float], target: list[float]) -> tuple[float, float, float, float]:
    """Signed errors of a box: centre offset x, y as a share of the target's side, log width and height ratio."""
    side = max(target[2] - target[0], target[3] - target[1])
    dx = ((box[0] + box[2]) - (target[0] + target[2])) / 2 / side
    dy = ((box[1] + box[3]) - (target[1] + target[3])) / 2 / side
    dw = math.log(max(box[2] - box[0], 1e-3) / (target[2] - target[0]))
    dh = math.log(max(box[3] - box[1], 1e-3) / (target[3] - target[1]))
    return dx, dy, dw, dh


def answers(generator: CandidateGenerator, rows: list[dict], world: Path, batch: int) -> list[list[list[float]]]:
    """Each question's answer boxes (``xyxy``; NaN for an answer without a box)."""
    return [[list(rec_box(generator.codec.decode(t, size))) for t in texts]
            for _, size, texts in answer_rec_questions(generator, rows, world, batch)]


def pct(part: float, whole: float) -> str:
    return f"{100 * part / max(whole, 1):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("world")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coord-format", default="minigpt_v2")
    args = parser.parse_args()
    world = Path(args.world)
    rows = read_rec_questions(world / f"sft_{args.split}.jsonl")
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.questions]
    objects = image_objects(world / "annotations" / f"instances_{args.split}.json")
    torch.manual_seed(args.seed)
    greedy_gen = CandidateGenerator(args.model, args.coord_format, num_candidates=1, do_sample=False,
                                    max_new_tokens=24, seed=args.seed)
    greedy_gen.configure_model()
    greedy = [a[0] for a in answers(greedy_gen, rows, world, args.batch_size)]
    sample_gen = CandidateGenerator(args.model, args.coord_format, num_candidates=args.samples, temperature=1.0,
                                    top_p=1.0, max_new_tokens=24, seed=args.seed)
    sample_gen.configure_model()
    sampled = answers(sample_gen, rows, world, args.batch_size)

    n = len(rows)
    share_buckets: Counter[str] = Counter()
    distinct, on_target_of_landed = [], []
    head = Counter()
    errors: list[tuple[float, float, float, float]] = []
    for row, g, samples in zip(rows, greedy, sampled):
        objs = objects[row["image"]]
        target = landing(row["boxes"][0], objs)
        land = [landing(s, objs) for s in samples]
        t_ious = [answer_iou(s, row["boxes"][0]) for s in samples]
        g_iou = answer_iou(g, row["boxes"][0])
        g_land = landing(g, objs)
        on_target = sum(o is not None and o == target for o in land) / len(land)
        share_buckets["0" if on_target == 0 else "all" if on_target == 1 else "<1/2" if on_target < 0.5
                      else ">=1/2"] += 1
        distinct.append(len({o for o in land if o is not None}))
        landed = [o for o in land if o is not None]
        if landed:
            on_target_of_landed.append(sum(o == target for o in landed) / len(landed))
        best = max(t_ious)
        head["greedy@0.5"] += g_iou >= 0.5
        head["greedy@0.75"] += g_iou >= 0.75
        head["best@0.5"] += best >= 0.5
        head["best@0.75"] += best >= 0.75
        greedy_on_target = g_land is not None and g_land == target
        if g_iou < 0.5 and best >= 0.5:
            head["gain@0.5 greedy off target"] += 1
        if g_iou < 0.75 and best >= 0.75:
            head["gain@0.75 greedy on target (precision)" if greedy_on_target
                 else "gain@0.75 greedy off target (selection)"] += 1
        head["greedy on target"] += greedy_on_target
        if greedy_on_target:
            errors.append(box_error(g, row["boxes"][0]))
    print(f"{args.model}: {n} {args.split} REC questions, greedy + {args.samples} samples at temperature 1")
    print("share of a question's samples on the named object: "
          + ", ".join(f"{k} {pct(share_buckets[k], n)}" for k in ("0", "<1/2", ">=1/2", "all")))
    print(f"distinct objects the samples land on: mean {statistics.mean(distinct):.2f}; of the samples that land on "
          f"an object, on the named one: mean {statistics.mean(on_target_of_landed):.2f}")
    print(f"greedy: on the named object {pct(head['greedy on target'], n)}, Acc@0.5 {pct(head['greedy@0.5'], n)}, "
          f"Acc@0.75 {pct(head['greedy@0.75'], n)}")
    print(f"best of {args.samples}: Acc@0.5 {pct(head['best@0.5'], n)}, Acc@0.75 {pct(head['best@0.75'], n)}")
    print(f"headroom at 0.75 (best >= 0.75, greedy < 0.75): {pct(head['gain@0.75 greedy on target (precision)'], n)} "
          f"precision (greedy on the named object), {pct(head['gain@0.75 greedy off target (selection)'], n)} "
          "selection (greedy on another object or none)")
    if errors:
        cols = list(zip(*errors))
        print("greedy answers on the named object, signed error mean ± std (a shared bias is one correction for "
              "every box; scatter around zero has to be corrected box by box): " + ", ".join(
                  f"{name} {statistics.mean(c):+.3f} ± {statistics.pstdev(c):.3f}"
                  for name, c in zip(("centre x / side", "centre y / side", "log width ratio", "log height ratio"),
                                     cols)))


if __name__ == "__main__":
    main()

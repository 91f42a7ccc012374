"""One-off probe (docs/results/notebook.md, "Reading works, finding does not"): REG questions, the opposite of REC.

For every annotated object of an SPR-Shapes split, the question "What is the object at {box}? Answer in a few
words." answered with its category ("a small red circle"), as SFT lines (the format ``datamodules.sft`` reads),
boxes written with the world's coordinate codec. With ``--mix REC_JSONL`` the REC lines are added and the whole is
shuffled (the REC + REG training file); without it the file is a probe set for ``answer_probe``:

    python docs/results/probes/reg_questions.py FEW/scenes_train/annotations/instances_train.json FEW/rec_reg.jsonl \\
        --mix FEW/rec_train.jsonl
    python docs/results/probes/reg_questions.py FEW/scenes_test/annotations/instances_test.json FEW/reg_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from spr_lightning.coords import get_codec
from spr_lightning.quickstart import COORD_FORMAT

PROMPT = "What is the object at {box}? Answer in a few words."


def reg_lines(instances: dict) -> list[dict]:
    """One REG line per annotation of a COCO-format ``instances`` file (image paths under ``images/``)."""
    codec = get_codec(COORD_FORMAT)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    images = {i["id"]: i for i in instances["images"]}
    lines = []
    for ann in instances["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        box = [x, y, x + w, y + h]
        prompt = PROMPT.format(box=codec.encode(box, (image["width"], image["height"])))
        lines.append({"id": f"reg-{ann['id']}", "image": f"images/{image['file_name']}",
                      "image_size": [image["width"], image["height"]], "task": "reg", "region": None,
                      "prompt": prompt, "answer": f"a {names[ann['category_id']]}", "boxes": [box]})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instances", type=Path, help="an SPR-Shapes instances_<split>.json")
    parser.add_argument("out", type=Path, help="the SFT lines to write")
    parser.add_argument("--mix", type=Path, default=None, help="REC SFT lines to add; the result is shuffled")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = reg_lines(json.loads(args.instances.read_text(encoding="utf-8")))
    if args.mix is not None:
        rec = [json.loads(line) for line in args.mix.read_text(encoding="utf-8").splitlines() if line.strip()]
        lines = rec + lines
        random.Random(args.seed).shuffle(lines)
    args.out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    print(f"{len(lines)} lines -> {args.out}")


if __name__ == "__main__":
    main()

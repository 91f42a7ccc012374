"""One-off probe (docs/results/notebook.md, "Grounding attention"): where a REC answer's lookup breaks, teacher-forced
on a world's REC lines.

For each REC line (the right answer given), at the position that predicts the box's first coordinate:

* ``attention``: each head's mean attention mass on the target's patches, and for the supervised head
  (``--layer``/``--head``) where its image argmax lies: on the target, on another object, on the background, per
  number of words in the expression;
* ``probes``: held-out accuracy of linear probes for the target's colour and shape, read at the query position
  (what the answer position knows about the expression: only for expressions naming size, colour and shape) and
  at the target's patches (what the image tokens carry), per layer input (0: embeddings / projector output).

    python docs/results/probes/lookup_probe.py MODEL SCENES --split test --samples 600

``SCENES`` is a world folder (``write_world`` layout: ``sft_<split>.jsonl``, ``annotations/instances_<split>.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from PIL import Image

from datamodules.sft import SFTCollator
from spr_lightning.grounding_attention import box_queries, location_token_values
from spr_lightning.models import load_policy, load_processor


def load_lines(scenes: Path, split: str, samples: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """The first ``samples`` REC lines of the split and each image's annotations (by image path)."""
    instances = json.loads((scenes / "annotations" / f"instances_{split}.json").read_text())
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    objects: dict[str, list[dict]] = collections.defaultdict(list)
    for ann in instances["annotations"]:
        objects[files[ann["image_id"]]].append(ann)
    lines = [json.loads(line) for line in (scenes / f"sft_{split}.jsonl").read_text().splitlines()]
    return [line for line in lines if line["task"] == "rec"][:samples], objects


def expression_words(prompt: str) -> int:
    """Words of the expression in ``"Give the bounding box of the X."`` (or the older ``"Where is the X? ..."``)."""
    if prompt.startswith("Give the bounding box of the "):
        return len(prompt[len("Give the bounding box of the "):].rstrip(".").split())
    return len(prompt.split("Where is the ", 1)[1].split("?", 1)[0].split())


def linear_probe(rows: list[tuple[torch.Tensor, str]]) -> tuple[float, float]:
    """Held-out (last 30%) accuracy of a ridge-regularised softmax probe, and chance (1 / classes)."""
    torch.manual_seed(0)
    features = torch.stack([r[0] for r in rows]).float()
    classes = sorted({r[1] for r in rows})
    target = torch.tensor([classes.index(r[1]) for r in rows])
    cut = int(0.7 * len(rows))
    features = (features - features[:cut].mean(0)) / (features[:cut].std(0) + 1e-6)
    weight = torch.zeros(features.shape[1], len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(features[:cut] @ weight, target[:cut]) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (features[cut:] @ weight).argmax(1).eq(target[cut:]).float().mean().item(), 1 / len(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved small LLaVA (MiniGPT-v2 location tokens)")
    parser.add_argument("scenes", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--layer", type=int, default=-1, help="the supervised layer")
    parser.add_argument("--head", type=int, default=0, help="the supervised head")
    args = parser.parse_args()
    lines, objects = load_lines(args.scenes, args.split, args.samples)
    processor, model = load_processor(args.model), load_policy(args.model)
    model.set_attn_implementation("eager")
    model.eval()
    values, collate = location_token_values(processor.tokenizer), SFTCollator(processor)
    image_token_id = model.config.image_token_id
    masses: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    argmax: collections.Counter = collections.Counter()
    features: dict[tuple[str, int, str], list] = collections.defaultdict(list)
    for start in range(0, len(lines), 16):
        chunk = lines[start:start + 16]
        batch = collate([{"key": line["id"], "prompt": line["prompt"], "answer": line["answer"],
                          "image": Image.open(args.scenes / line["image"]).convert("RGB")} for line in chunk])
        inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
        with torch.no_grad():
            out = model.model(**inputs, output_attentions=True, output_hidden_states=True)
        layers = len(out.attentions)
        for query in box_queries(batch["input_ids"], batch["labels"], image_token_id, values):
            line = chunk[query.row]
            image_file = line["image"].split("images/", 1)[1]
            x1, y1, x2, y2 = line["boxes"][0]
            target = min(objects[image_file], key=lambda a: abs(a["bbox"][0] - x1) + abs(a["bbox"][1] - y1))
            words = expression_words(line["prompt"])
            for layer, attention in enumerate(out.attentions):
                for head in range(attention.shape[1]):
                    masses[(layer, head)].append(attention[query.row, head, query.query, query.targets].sum().item())
            image_positions = (batch["input_ids"][query.row] == image_token_id).nonzero().flatten()
            grid = int(len(image_positions) ** 0.5)
            scores = out.attentions[args.layer][query.row, args.head, query.query, image_positions]
            patch = int(scores.argmax())
            size = line["image_size"]
            cx, cy = (patch % grid + 0.5) / grid * size[0], (patch // grid + 0.5) / grid * size[1]
            if x1 <= cx <= x2 and y1 <= cy <= y2:
                where = "target"
            elif any(bx <= cx <= bx + bw and by <= cy <= by + bh for bx, by, bw, bh in
                     (a["bbox"] for a in objects[image_file])):
                where = "other object"
            else:
                where = "background"
            argmax[(words, where)] += 1
            for layer, hidden in enumerate(out.hidden_states):
                for attribute in ("color", "shape"):
                    label = target["attributes"][attribute]
                    features[("image tokens", layer, attribute)].append(
                        (hidden[query.row, query.targets].mean(0), label))
                    if words == 3:
                        features[("query position", layer, attribute)].append(
                            (hidden[query.row, query.query], label))
    print(f"supervised head ({args.layer % layers}, {args.head}): image argmax by expression words")
    for words in sorted({w for w, _ in argmax}):
        counts = {where: argmax[(words, where)] for where in ("target", "other object", "background")}
        print(f"  {words} word(s): {counts}")
    print("mean attention mass on the target's patches: " + ", ".join(
        f"({layer},{head}) {sum(v) / len(v):.3f}" for (layer, head), v in sorted(masses.items())))
    print("linear probes (held-out accuracy, chance):")
    for (where, layer, attribute), rows in sorted(features.items()):
        accuracy, chance = linear_probe(rows)
        print(f"  {where:15s} layer input {layer}  {attribute:6s} {accuracy:.2f} ({chance:.2f}, n {len(rows)})")


if __name__ == "__main__":
    main()

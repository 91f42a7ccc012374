"""One-off probe (docs/results.md, "Can the language model do it in text?"): train the SFT start's language model
(same Llama config and tokenizer, random init) on REC written out in words, with no image at all.

Each sample lists a world image's objects in reading order as ``size colour shape <x1><y1><x2><y2>`` (MiniGPT-v2
bins), then asks ``where is the <size colour shape> ?`` for an object whose words are unique in the image; the loss
is on the four answer tokens. Every 500 steps, on 300 held-out images: how often the teacher-forced ``x1, y1``
lands nearest the referred object (``right``; ``chance_right`` is one over the objects listed). If this language
model cannot learn the lookup even when the words are literally in its input, no projector will make it do so from
image tokens. Run by hand, not part of the package:

    python docs/results/probes/text_recall.py BASE_MODEL INSTANCES_JSON --out F [--steps 4000] [--objects K]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import time

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM


def bin_token(value: float, size: int = 224) -> str:
    return f"<{min(100, max(0, int(value / size * 100)))}>"


def load_objects(instances: str) -> dict[int, list[tuple[str, list[float]]]]:
    data = json.load(open(instances, encoding="utf-8"))
    objects: dict[int, list[tuple[str, list[float]]]] = collections.defaultdict(list)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        words = " ".join(ann["attributes"][k] for k in ("size", "color", "shape"))
        objects[ann["image_id"]].append((words, [x, y, x + w, y + h]))
    return objects


def make_sample(
    objects: list[tuple[str, list[float]]], rng: random.Random, most: int = 0
) -> tuple[str, str, int, list]:
    """One listing + question; ``most > 0`` lists only that many of the image's objects (drawn at random)."""
    chosen = rng.sample(objects, most) if 0 < most < len(objects) else objects
    ordered = sorted(chosen, key=lambda o: (o[1][1] + o[1][3], o[1][0] + o[1][2]))
    counts = collections.Counter(words for words, _ in ordered)
    unique = [i for i, (words, _) in enumerate(ordered) if counts[words] == 1]
    if not unique:  # every listed object has a twin: draw again
        return make_sample(objects, rng, most)
    target = rng.choice(unique)
    listing = " ; ".join(f"{words} {''.join(bin_token(v) for v in box)}" for words, box in ordered)
    prompt = f"{listing} . where is the {ordered[target][0]} ?"
    return prompt, "".join(bin_token(v) for v in ordered[target][1]), target, ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_model")
    parser.add_argument("instances")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objects", type=int, default=0, help="list at most this many objects (0: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    config = AutoConfig.from_pretrained(args.base_model).text_config
    config.num_hidden_layers = args.layers
    model = LlamaForCausalLM(config)
    objects = load_objects(args.instances)
    ids = sorted(objects)
    test_ids, train_ids = ids[-300:], ids[:-300]
    coordinate = {tokenizer.convert_tokens_to_ids(f"<{i}>"): i for i in range(101)}

    def encode(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs, labels = [], []
        for prompt, answer, *_ in batch:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width, pad = max(map(len, seqs)), tokenizer.pad_token_id or 0
        return (torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
                torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
                torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        stats: collections.Counter = collections.Counter()
        rng = random.Random(1)
        for start in range(0, len(test_ids), 50):
            batch = [make_sample(objects[i], rng, args.objects) for i in test_ids[start : start + 50]]
            inputs, labels, mask = encode(batch)
            logits = model(input_ids=inputs, attention_mask=mask).logits
            for row, (_, _, target, ordered) in enumerate(batch):
                first = int((labels[row] != -100).nonzero()[0])
                x1, y1 = (coordinate.get(int(t), -99) for t in logits[row, first - 1 : first + 1].argmax(-1))
                bins = [[int(bin_token(v)[1:-1]) for v in box] for _, box in ordered]
                nearest = min(range(len(ordered)), key=lambda i: abs(bins[i][0] - x1) + abs(bins[i][1] - y1))
                stats["right"] += nearest == target
                stats["colour"] += ordered[nearest][0].split()[1] == ordered[target][0].split()[1]
                stats["chance_right"] += 1 / len(ordered)
                stats["n"] += 1
        model.train()
        n = stats.pop("n")
        return {k: round(v / n, 3) for k, v in stats.items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng, started, log = random.Random(0), time.time(), []
    for step in range(1, args.steps + 1):
        inputs, labels, mask = encode([make_sample(objects[rng.choice(train_ids)], rng, args.objects)
                                      for _ in range(args.batch)])
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 500 == 0 or step == args.steps:
            log.append({"step": step, "loss": round(loss.item(), 3), "seconds": round(time.time() - started),
                        **evaluate()})
            print(log[-1], flush=True)
    json.dump({"args": vars(args), "log": log}, open(args.out, "w", encoding="utf-8"), indent=1)


if __name__ == "__main__":
    main()

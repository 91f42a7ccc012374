"""One-off probe (docs/results/notebook.md, "Can the language model do it in text?"): train the SFT start's language
model (same Llama config and tokenizer, random init) on REC written out in words, with no image at all.

Each sample lists a world image's objects in reading order as ``size colour shape <x1><y1><x2><y2>`` (MiniGPT-v2
bins), then asks ``where is the <size colour shape> ?`` for an object whose words are unique in the image; the loss
is on the four answer tokens. Every 500 steps, on 300 held-out images: how often the teacher-forced ``x1, y1``
lands nearest the referred object (``right``; ``chance_right`` is one over the objects listed). If this language
model cannot learn the lookup even when the words are literally in its input, no projector will make it do so from
image tokens. Run by hand, not part of the package:

    python docs/results/probes/text_recall.py BASE_MODEL INSTANCES_JSON --out F [--steps 4000] [--objects K]
        [--curriculum] [--hidden 128] [--layers 2] [--lr 1e-3] [--batch 16]

``--curriculum`` starts with two listed objects and lists one more each time the last 100 training batches placed
``x1`` exactly on the referred object's bin at least ``--promote`` of the time (then all of them: the harder cases
come only once the easy lookup works). Token ids are built per piece (each object's words, each location token),
which is how the tokenizer splits a whole listing anyway, and logits are taken only at the answer positions.
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


def bin_index(value: float, size: int = 224) -> int:
    """The MiniGPT-v2 location bin (0..100) of a pixel coordinate."""
    return min(100, max(0, int(value / size * 100)))


def load_objects(instances: str) -> dict[int, list[tuple[str, list[float]]]]:
    data = json.load(open(instances, encoding="utf-8"))
    objects: dict[int, list[tuple[str, list[float]]]] = collections.defaultdict(list)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        words = " ".join(ann["attributes"][k] for k in ("size", "color", "shape"))
        objects[ann["image_id"]].append((words, [x, y, x + w, y + h]))
    return objects


def make_sample(objects: list[tuple[str, list[float]]], rng: random.Random, most: int = 0) -> tuple[int, list]:
    """The listed objects in reading order and the index of the one asked about (its words unique among them);
    ``most > 0`` lists only that many of the image's objects (drawn at random)."""
    chosen = rng.sample(objects, most) if 0 < most < len(objects) else objects
    ordered = sorted(chosen, key=lambda o: (o[1][1] + o[1][3], o[1][0] + o[1][2]))
    counts = collections.Counter(words for words, _ in ordered)
    unique = [i for i, (words, _) in enumerate(ordered) if counts[words] == 1]
    if not unique:  # every listed object has a twin: draw again
        return make_sample(objects, rng, most)
    return rng.choice(unique), ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_model")
    parser.add_argument("instances")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=0, help="hidden size (0: the base model's)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objects", type=int, default=0, help="list at most this many objects (0: all)")
    parser.add_argument("--curriculum", action="store_true", help="grow the listing from 2 objects (see above)")
    parser.add_argument("--promote", type=float, default=0.8)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    config = AutoConfig.from_pretrained(args.base_model).text_config
    config.num_hidden_layers = args.layers
    if args.hidden:
        heads = args.hidden // 32
        config.update({"hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
                       "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "head_dim": 32})
    model = LlamaForCausalLM(config)
    objects = load_objects(args.instances)
    ids = sorted(objects)
    test_ids, train_ids = ids[-300:], ids[:-300]
    location_ids = [tokenizer.convert_tokens_to_ids(f"<{i}>") for i in range(101)]
    coordinate = {token: i for i, token in enumerate(location_ids)}
    pieces: dict[str, list[int]] = {}

    def piece(text: str) -> list[int]:
        if text not in pieces:
            pieces[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return pieces[text]

    def box_ids(box: list[float]) -> list[int]:
        return [location_ids[bin_index(v)] for v in box]

    def encode(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask, the positions whose logits predict the answer, and the answer ids."""
        seqs, answers = [], []
        for target, ordered in batch:
            ids_: list[int] = []
            for i, (words, box) in enumerate(ordered):
                ids_ += (piece(" ; ") if i else []) + piece(words + " ") + box_ids(box)
            ids_ += piece(" . where is the ") + piece(ordered[target][0] + " ") + piece("?")
            answer = box_ids(ordered[target][1])
            seqs.append(ids_ + answer)
            answers.append(answer)
        width, pad = max(map(len, seqs)), tokenizer.pad_token_id or 0
        inputs = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        positions = torch.tensor([[len(s) - 5 + k for k in range(4)] for s in seqs])
        return inputs, mask, positions, torch.tensor(answers)

    def answer_logits(inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = model.model(input_ids=inputs, attention_mask=mask).last_hidden_state
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return model.lm_head(picked)

    @torch.no_grad()
    def evaluate(most: int) -> dict[str, float]:
        model.eval()
        stats: collections.Counter = collections.Counter()
        rng = random.Random(1)
        for start in range(0, len(test_ids), 50):
            batch = [make_sample(objects[i], rng, most) for i in test_ids[start : start + 50]]
            logits = answer_logits(*encode(batch)[:3])
            for row, (target, ordered) in enumerate(batch):
                x1, y1 = (coordinate.get(int(t), -99) for t in logits[row, :2].argmax(-1))
                bins = [[bin_index(v) for v in box] for _, box in ordered]
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
    most = 2 if args.curriculum else args.objects
    recent: collections.deque = collections.deque(maxlen=100)
    for step in range(1, args.steps + 1):
        inputs, mask, positions, answers = encode(
            [make_sample(objects[rng.choice(train_ids)], rng, most) for _ in range(args.batch)])
        logits = answer_logits(inputs, mask, positions)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        recent.append((logits[:, 0].argmax(-1) == answers[:, 0]).float().mean().item())
        if args.curriculum and most and len(recent) == recent.maxlen and sum(recent) / len(recent) >= args.promote:
            most = most + 1 if most < 16 else 0  # 0: the whole listing
            recent.clear()
            print({"step": step, "now_listing": most or "all"}, flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            log.append({"step": step, "listing": most or "all", "loss": round(loss.item(), 3),
                        "train_x1_exact": round(sum(recent) / max(1, len(recent)), 3),
                        "seconds": round(time.time() - started), **evaluate(args.objects)})
            print(log[-1], flush=True)
    json.dump({"args": vars(args), "log": log}, open(args.out, "w", encoding="utf-8"), indent=1)


if __name__ == "__main__":
    main()

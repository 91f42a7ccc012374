"""How well does a model predict each *kind* of answer token, given the right answer so far?

``python -m spr_lightning.experiments.answer_probe MODEL SFT_JSONL [--task region] [--samples 200]``

Teacher-forced next-token accuracy on SFT samples (the format :mod:`datamodules.sft` reads), split by what the
target token says: a colour, a shape or a size word of SPR-Shapes, a coordinate (a location token such as
``<42>`` or a digit), or anything else. It answers in a minute what generation + scoring answers in many: does the
model read an object's attributes off the image (colour/shape accuracy in region descriptions), and does it find the
object a phrase names (coordinate accuracy after the phrase)? Run it on the training file and on the test file: a
large gap is memorisation, equal low numbers are a skill not learned. With one word per token, chance is 1/8 for a
colour and 1/6 for a shape, as with the quickstart's tokenizer now; models built with
``split_words=False`` (before session 13) merge frequent word pairs (``"redĠdiamond"``, ``"AĠlargeĠ"``), and such a
token counts for every kind it contains, so for them compare models (and train with test) rather than with chance.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spr_lightning.experiments._probe_cli import probe_parser, write_result
from spr_lightning.shapes.scene import COLORS, SHAPES, SIZES

KINDS = ("colour", "shape", "size", "coord", "other")
_WORDS = {"colour": set(COLORS), "shape": set(SHAPES), "size": set(SIZES)}
_COORD = re.compile(r"^(<\d+>|\d+)$")


def token_kinds(text: str) -> tuple[str, ...]:
    """The kinds of one decoded token: ``("colour", "shape")`` for ``" red diamond"``, ``("coord",)`` for ``"<42>"``."""
    stripped = text.strip()
    if _COORD.match(stripped):
        return ("coord",)
    words = set(re.findall(r"[a-z]+", stripped.lower()))
    kinds = tuple(kind for kind, vocabulary in _WORDS.items() if words & vocabulary)
    return kinds or ("other",)


def select_samples(jsonl: str | Path, tasks: Sequence[str] | None, samples: int | None, seed: int = 0,
                   image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Records of ``jsonl`` (validated by :func:`datamodules.sft.read_sft_jsonl`) whose ``task`` is in ``tasks``
    (all when ``None``), a seeded random ``samples`` of them (all when ``None``)."""
    from datamodules.sft import read_sft_jsonl

    records = read_sft_jsonl(jsonl, image_root)
    if tasks is not None:
        wanted = set(tasks)
        records = [r for r in records if r["task"] in wanted]
        if not records:
            raise ValueError(f"{jsonl}: no samples with task in {sorted(wanted)}")
    random.Random(seed).shuffle(records)
    return records if samples is None else records[:samples]


@torch.no_grad()
def answer_probe(model: Any, processor: Any, records: list[dict[str, Any]], batch_size: int = 16,
                 max_length: int | None = 2048) -> dict[str, dict[str, float]]:
    """Teacher-forced accuracy per token kind: ``{kind: {"accuracy": a, "tokens": n}}`` for every kind seen."""
    from datamodules.sft import SFTCollator, SFTDataset

    dataset, collate = SFTDataset(records), SFTCollator(processor, max_length=max_length)
    tokenizer = processor.tokenizer
    kinds_of: dict[int, tuple[str, ...]] = {}
    hits = {kind: 0 for kind in KINDS}
    counts = {kind: 0 for kind in KINDS}
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        batch.pop("keys")
        logits = model(**batch).logits
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        scored = target != -100
        for guess, truth in zip(predicted[scored].tolist(), target[scored].tolist()):
            if truth not in kinds_of:
                kinds_of[truth] = token_kinds(tokenizer.decode([truth]))
            for kind in kinds_of[truth]:
                counts[kind] += 1
                hits[kind] += guess == truth
    return {kind: {"accuracy": hits[kind] / counts[kind], "tokens": counts[kind]} for kind in KINDS if counts[kind]}


def format_probe(result: dict[str, dict[str, float]]) -> str:
    lines = ["| token kind | accuracy | tokens |", "|---|---|---|"]
    lines += [f"| {kind} | {100 * v['accuracy']:.1f}% | {int(v['tokens'])} |" for kind, v in result.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = probe_parser("spr_lightning.experiments.answer_probe", __doc__)
    parser.add_argument("model", help="model folder (or hub id / tiny:<family>), loaded like every stage loads it")
    parser.add_argument("sft_jsonl", help="SFT samples: the world's sft_train.jsonl / sft_test.jsonl")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the file's)")
    parser.add_argument("--task", nargs="+", default=None, help="keep samples of these tasks (rec, region, phrase)")
    parser.add_argument("--samples", type=int, default=200, help="random samples probed (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which random samples")
    args = parser.parse_args(argv)
    from spr_lightning.models import load_policy, load_processor

    records = select_samples(args.sft_jsonl, args.task, args.samples, args.seed, args.image_root)
    result = answer_probe(load_policy(args.model), load_processor(args.model), records, args.batch_size)
    print(f"{args.model} on {len(records)} samples of {args.sft_jsonl} (teacher-forced)\n{format_probe(result)}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()

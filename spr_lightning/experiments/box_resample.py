"""Candidates that differ only in their boxes: the policy re-samples every box of one description, words fixed.

A control for the issue-#11 experiment. SPR's candidates are whole sampled descriptions, so two candidates differ
in *which* objects they describe as much as in how well they box them; a reward that prefers one (even an oracle)
can teach the policy to pick objects it boxes well (large ones, session 17) rather than to box better the object a
phrase names, which is all REC and phrase grounding score. Here each region's description (its ``base`` candidate,
on-policy) is kept token for token and only its coordinate tokens are sampled again from the policy, ``variants``
times, under the canonical prompt on the full image (DPO's input): every coordinate is drawn from the policy's own
distribution given the fixed words before it (and the boxes drawn before it), restricted to location tokens. The
result is an ordinary candidates folder, so SPR's score stage (or :mod:`~spr_lightning.experiments.oracle_pairs`)
ranks the variants and makes pairs whose two sides name the same objects and differ in where they put them.

Needs a box format with one token per coordinate (``minigpt_v2``'s ``<0>``-``<100>``); others are refused.

    python -m spr_lightning.experiments.box_resample MODEL CANDIDATES_DIR OUT_DIR [--variants 4] [--adapter A]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["box_slots", "build_constraint", "location_token_ids", "main", "resample_boxes", "slot_positions"]

_LOCATION = re.compile(r"^<\d+>$")


def location_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens that are exactly one location token (``<0>``, ``<42>``...), sorted.

    Raises:
        ValueError: the vocabulary has none (the model's box format does not use location tokens).
    """
    ids = sorted(i for token, i in tokenizer.get_vocab().items() if _LOCATION.match(token))
    if not ids:
        raise ValueError("the tokenizer has no location tokens (<0>, <1>, ...): box resampling needs a format with "
                         "one token per coordinate, such as minigpt_v2")
    return ids


def slot_positions(token_ids: Sequence[int], location_ids: Sequence[int]) -> list[bool]:
    """Per token of a description: is it a coordinate (a slot to sample again) or a word (kept)?"""
    locations = set(location_ids)
    return [t in locations for t in token_ids]


def box_slots(slots: Sequence[bool]) -> list[list[int]]:
    """Positions of each box's coordinates: runs of consecutive slots (``{<a><b><c><d>}`` is one run of four)."""
    boxes: list[list[int]] = []
    for position, slot in enumerate(slots):
        if slot and boxes and boxes[-1][-1] == position - 1:
            boxes[-1].append(position)
        elif slot:
            boxes.append([position])
    return boxes


def build_constraint(descriptions: Sequence[Sequence[int]], prompt_length: int, location_ids: Sequence[int],
                     eos_id: int, free: Sequence[Sequence[bool]] | None = None,
                     ) -> Callable[[int, torch.Tensor], list[int]]:
    """A ``prefix_allowed_tokens_fn`` for ``generate``: every sequence of prompt ``i`` (``generate`` passes the
    prompt's index, for all its ``num_return_sequences``) must write description ``i``'s tokens as they are,
    except where ``free[i]`` is true (default: at every location token), where it may write any location token;
    it ends with ``eos_id``. ``prompt_length`` is the (left-padded) prompt length of the batch."""
    if free is None:
        free = [slot_positions(d, location_ids) for d in descriptions]
    allowed_locations = list(location_ids)

    def allowed(index: int, sequence: torch.Tensor) -> list[int]:
        step = sequence.shape[-1] - prompt_length
        tokens = descriptions[index]
        if step >= len(tokens):
            return [eos_id]
        return allowed_locations if free[index][step] else [int(tokens[step])]

    return allowed


def _read_regions(candidates_dir: str | Path) -> list[tuple[str, dict[str, Any], bytes]]:
    """``(key, record, image bytes)`` of every region of a candidates folder, as the score stage reads them."""
    from datamodules.preference import expand_urls
    from spr_lightning.experiments.pair_quality import pair_samples
    from spr_lightning.shards import ShardFormatError

    if not Path(candidates_dir).is_dir():
        raise FileNotFoundError(f"candidate shard folder {candidates_dir} does not exist")
    regions = []
    for shard, key, members in pair_samples(expand_urls(str(candidates_dir))):
        record = json.loads(members["json"])
        image = next((members[k] for k in ("jpg", "jpeg", "png", "webp") if k in members), None)
        if image is None or not isinstance(record.get("candidates"), list) or not record["candidates"]:
            raise ShardFormatError(f"{shard}: sample {key!r} needs an image and a non-empty 'candidates' list")
        regions.append((key, record, image))
    return regions


def resample_boxes(model: str, candidates_dir: str | Path, out_dir: str | Path, *, variants: int = 4,
                   temperature: float = 1.0, top_p: float = 1.0, base: int | Sequence[int] = 0, batch_size: int = 8,
                   seed: int = 0,
                   adapter_path: str | None = None, coord_format: str = "minigpt_v2", one_box: bool = False,
                   progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Write a candidates folder whose candidates are ``variants`` box re-samplings of each region's ``base``
    candidate (words kept, every coordinate drawn again from ``model`` at ``temperature``). With ``one_box`` only
    one box per region (picked at random, the same for all its variants) is drawn again and the others are kept, so
    any two variants differ in exactly that box: a pair then says which box is better, not which of several.

    ``base`` may list several candidates (``[0, 1, 2, 3]``): each region then gives one sample per listed candidate
    it has, keyed ``<region key>_b<k>`` (so the score stage's resume tells them apart); a single ``base`` keeps the
    region's key. ``device`` (e.g. ``"cuda"``) is where the policy runs; the CPU by default.

    Returns:
        the summary (also ``out_dir/summary.json``): regions, regions skipped (a base without boxes), variants,
        and how many variants equal their base description.
    """
    import io

    from PIL import Image
    from tqdm import tqdm

    from callbacks import ShardWriter
    from datamodules.collate import encode_completions, render_prompt_and_completion
    from spr_lightning.generation import CandidateGenerator

    if variants < 2:
        raise ValueError(f"variants must be >= 2 to make a pair, got {variants}")
    generator = CandidateGenerator(model, coord_format, num_candidates=variants, temperature=temperature,
                                   top_p=top_p, seed=seed, adapter_path=adapter_path)
    generator.configure_model()
    if device is not None:
        generator.to(device)
    tokenizer = generator.processor.tokenizer
    location_ids = location_token_ids(tokenizer)
    eos_id = tokenizer.eos_token_id
    several = not isinstance(base, int)
    bases = list(base) if several else [base]
    if several and (not bases or min(bases) < 0):
        raise ValueError(f"base must list candidate indices >= 0, got {bases}")
    work = []  # (output key, record, image, candidate index)
    for key, record, image in _read_regions(candidates_dir):
        if several:
            work += [(f"{key}_b{k}", record, image, k) for k in bases if k < len(record["candidates"])]
        else:
            work.append((key, record, image, min(base, len(record["candidates"]) - 1)))
    writer = ShardWriter(str(out_dir), prefix="candidates", samples_per_shard=200).start()
    stats = {"regions": 0, "skipped": 0, "variants": variants, "same_as_base": 0, "bases": bases}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    source = model if adapter_path is None else f"{model} + {adapter_path}"
    for first in tqdm(range(0, len(work), batch_size), desc="box resampling", unit="batch", disable=not progress):
        batch = []
        for key, record, image, index in work[first:first + batch_size]:
            text = record["candidates"][index]
            # tokenised as DPO tokenises the answer (after the chat template: a leading space, the end token)
            completion = render_prompt_and_completion(generator.processor, record["prompt"], text)[1]
            tokens = encode_completions(tokenizer, [completion])[0].tolist()
            slots = slot_positions(tokens, location_ids)
            if not any(slots):
                stats["skipped"] += 1
                continue
            if one_box:
                picked = set(rng.choice(box_slots(slots)))
                slots = [position in picked for position in range(len(tokens))]
            batch.append((key, record, image, text, tokens, slots))
        if not batch:
            continue
        images = [Image.open(io.BytesIO(image)).convert("RGB") for _, _, image, *_ in batch]
        inputs = generator.model_inputs([record["prompt"] for _, record, *_ in batch], images)
        constraint = build_constraint([item[4] for item in batch], inputs["input_ids"].shape[1], location_ids,
                                      eos_id, free=[item[5] for item in batch])
        with torch.no_grad():
            out = generator.model.generate(
                **inputs, num_return_sequences=variants, do_sample=True, temperature=temperature, top_p=top_p,
                max_new_tokens=max(len(item[4]) for item in batch) + 1, prefix_allowed_tokens_fn=constraint)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, (key, record, image, text, *_) in enumerate(batch):
            new = [t.strip() for t in texts[i * variants:(i + 1) * variants]]
            size = tuple(record["image_size"])
            stats["same_as_base"] += sum(t == text for t in new)
            record = {**record, "candidates": new, "raw_candidates": new, "templates": ["region"] * variants,
                      "candidate_boxes": [[list(g.xyxy) for g in generator.codec.decode(t, size)] for t in new],
                      "resampled_from": text, "resampled_boxes": "one" if one_box else "all", "model": source}
            writer.write_sample({"__key__": key, "json": json.dumps(record).encode(), "jpg": image})
            stats["regions"] += 1
    writer.finish()
    Path(out_dir, "summary.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.experiments.box_resample",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the policy: a from_pretrained folder (e.g. RUN/sft/model/final)")
    parser.add_argument("candidates", help="a generate stage's candidates folder (the descriptions to keep)")
    parser.add_argument("out", help="output candidates folder")
    parser.add_argument("--variants", type=int, default=4, help="box re-samplings per description")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass over location tokens")
    parser.add_argument("--base", type=int, nargs="+", default=[0],
                        help="which candidate(s) of each region keep their words (several: one sample each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-box", action="store_true", help="draw one box per region again, keep the others")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter applied on top of the model")
    parser.add_argument("--coord-format", default="minigpt_v2")
    parser.add_argument("--device", default=None, help="where the policy runs (e.g. cuda); default: the CPU")
    args = parser.parse_args(argv)
    summary = resample_boxes(args.model, args.candidates, args.out, variants=args.variants,
                             temperature=args.temperature, top_p=args.top_p,
                             base=args.base[0] if len(args.base) == 1 else args.base, batch_size=args.batch_size,
                             seed=args.seed, adapter_path=args.adapter, coord_format=args.coord_format,
                             one_box=args.one_box, device=args.device)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

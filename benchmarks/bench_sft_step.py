"""SFT step time on SPR-Shapes: random vs length-grouped batches, grounding-attention loss query by query vs batched.

Builds an SPR-Shapes world and the quickstart's small LLaVA (MiniGPT-v2 location tokens, 2 x 128 Llama, random
weights: the step costs what the quickstart's does) in a temporary folder, then times full SFT steps (forward,
backward, AdamW) of :class:`spr_lightning.sft.SFTModule` with the quickstart's settings. Four providers:

- ``random``: batches drawn as a plain shuffle does (what ``SFTDataModule`` did before ``group_by_length``);
- ``grouped``: batches from :class:`datamodules.sft.LengthGroupedSampler` (the quickstart's default now);
- each with the grounding-attention loss on (weight 1, boxes and phrases, as after the first quarter of the
  quickstart's SFT), ``+ga``, computed by the batched :func:`grounding_attention_loss` or, ``+ga_per_query``, by the
  query-by-query indexing it replaced (kept here as the reference).

Both losses are first checked to agree (1e-5) on a batch of each sampler. Rounds are interleaved (one step of
every provider per round, the same batch for the same sampler) so background load hits all alike. Prints a
markdown table: median / min ms per step, padded / real tokens, and each provider's speed relative to
``random+ga_per_query`` (the quickstart's SFT step before session 14).

    python benchmarks/bench_sft_step.py [--images 300] [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_quickstart_llava, build_shapes_sft_world, machine_info  # noqa: E402

import spr_lightning.sft as sft_module  # noqa: E402
from datamodules.sft import (  # noqa: E402
    LengthGroupedSampler,
    SFTCollator,
    SFTDataset,
    read_sft_jsonl,
    sample_lengths,
)
from spr_lightning.grounding_attention import grounding_attention_loss  # noqa: E402


def per_query_loss(attention: torch.Tensor, queries: list, head: int = 0) -> torch.Tensor:
    """The grounding-attention loss as it was computed before: one indexing op (and one backward) per query."""
    if not queries:
        return attention.new_zeros(())
    masses = torch.stack([attention[q.row, head, q.query, q.targets].sum() for q in queries])
    return -torch.log(masses.float().clamp_min(1e-6)).mean()


def build(tmp: Path, images: int) -> tuple[Path, Path]:
    return build_quickstart_llava(tmp), build_shapes_sft_world(tmp, images)


def loss_with(loss_fn: Any, module: Any, batch: dict[str, Any]) -> float:
    sft_module.grounding_attention_loss = loss_fn
    with torch.no_grad():
        return float(module.sft_step(batch)["loss"])


def batch_orders(records: list[dict[str, Any]], batch_size: int, rounds: int, seed: int) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)
    plain = [rng.sample(range(len(records)), batch_size) for _ in range(rounds)]
    order = list(LengthGroupedSampler(sample_lengths(records), batch_size, seed=seed))
    grouped = [order[k * batch_size : (k + 1) * batch_size] for k in range(rounds)]
    return {"random": plain, "grouped": grouped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="world train images (7 SFT samples each)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, jsonl = build(Path(tmp), args.images)
        records = read_sft_jsonl(jsonl)
        dataset = SFTDataset(records)
        providers = {f"{order}+{loss}": (order, loss) for order in ("random", "grouped")
                     for loss in ("ga_per_query", "ga")}
        module = sft_module.SFTModule(str(model_dir), lora=False, grounding_attention_weight=1.0,
                                      grounding_attention_phrase=True, lr=1e-3)
        collator = SFTCollator(module.processor, max_length=512)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        orders = batch_orders(records, args.batch_size, args.warmup + args.rounds, args.seed)
        batches = {name: [collator([dataset[i] for i in b]) for b in rows] for name, rows in orders.items()}
        check = max(abs(loss_with(per_query_loss, module, rows[0])
                            - loss_with(grounding_attention_loss, module, rows[0])) for rows in batches.values())
        if check > 1e-5:
            raise SystemExit(f"batched and per-query grounding-attention losses differ by {check:.2e}")
        times: dict[str, list[float]] = {name: [] for name in providers}
        for step in range(args.warmup + args.rounds):
            for name, (order, loss) in providers.items():
                per_query = loss == "ga_per_query"
                sft_module.grounding_attention_loss = per_query_loss if per_query else grounding_attention_loss
                start = time.perf_counter()
                module.sft_step(batches[order][step])["loss"].backward()
                optimizer.step()
                optimizer.zero_grad()
                if step >= args.warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
        sft_module.grounding_attention_loss = grounding_attention_loss
        padding = {name: sum(b["attention_mask"].numel() for b in rows) / sum(int(b["attention_mask"].sum())
                                                                               for b in rows)
                   for name, rows in batches.items()}
    info = machine_info()
    print(f"\n{info}\nthreads {args.threads}, batch {args.batch_size}, {args.rounds} rounds after {args.warmup} "
          f"warm-up, {len(records)} SFT samples of {args.images} images\n")
    base = statistics.median(times["random+ga_per_query"])
    print("| provider | median ms | min ms | padded / real tokens | speed vs random+ga_per_query |")
    print("|---|---:|---:|---:|---:|")
    for name, (order, _) in providers.items():
        median = statistics.median(times[name])
        print(f"| {name} | {median:.1f} | {min(times[name]):.1f} | {padding[order]:.2f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()

"""Data and scoring pipeline throughput: what our batching costs or saves against the plain loops.

Part 1, DPO data (pair shards → batches), samples/s over the same shards, one process, no workers, one torch
thread by default (``--data-threads``: what each DataLoader worker process gets; with 2 threads on a shared
machine the image resize ops stall on thread hand-offs and the numbers swing by 10x):

* ``bare_decode``: a plain ``webdataset`` loop (tar → JPEG/JSON decode), batched into lists;
* ``bare_decode+processor``: the same, plus one call of the LLaVA processor per batch on (image, prompt) — the
  image resize/normalise and prompt tokenisation any VLM input pipeline has to do;
* ``preference_datamodule``: ``PreferenceDataModule.train_dataloader()`` (decode, schema validation, then
  ``PreferenceCollator``: chat template for prompt, chosen and rejected, processor call, completion tokenisation,
  left/right padding).

Part 2, scoring stage (SPR §3.2), one round = all candidates of ``--queries`` queries x ``--candidates``:

* ``SemanticScorer.score`` on the tiny open_clip: one call for every query and candidate (crop and local
  encodes once per query, all texts in one batch) vs one call per candidate (what a per-candidate scorer does);
* ``kernels.localization_score`` (torch backend on CPU): one call on the padded ``[B, N, 4]`` box sets vs one
  call per candidate (``--threads`` applies to both parts).

Batched and looped results are checked to agree before timing. Providers of a part are interleaved per round so
that background load hits them alike; the median and the best of ``--repeats`` rounds are reported (on a shared
machine the best round is the closer estimate of the unloaded cost).

Usage::

    python benchmarks/bench_pipeline.py                          # 256 pairs, 640x480 JPEGs, 16 x 8 candidates
    python benchmarks/bench_pipeline.py --toy --repeats 1        # smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average, machine_info, save_bench_processor, write_bench_pairs, write_json  # noqa: E402

TARGETS = {"preference_datamodule": 0.8, "semantic": 3.0, "localization": 3.0}


def interleaved_times(providers: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every round per provider; one call of each provider per round, so a load spike on a shared
    machine hits one round of every provider rather than all rounds of one."""
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


# ------------------------------------------------------------------------------------------------- part 1: data
def batched(samples: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bare_samples(shards: list[str]) -> Iterable[dict[str, Any]]:
    import webdataset as wds

    return wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil")


def bare_decode(shards: list[str], batch_size: int) -> int:
    """Tar → decoded samples → lists of ``batch_size``; returns the sample count."""
    return sum(len(batch) for batch in batched(bare_samples(shards), batch_size))


def bare_decode_processor(shards: list[str], batch_size: int, processor: Any) -> int:
    """Bare decode plus one processor call per batch on the images and raw prompts (no chat template)."""
    count = 0
    for batch in batched(bare_samples(shards), batch_size):
        processor(images=[s["jpg"] for s in batch], text=["<image>\n" + s["json"]["prompt"] for s in batch],
                  return_tensors="pt", padding=True)
        count += len(batch)
    return count


def datamodule_batches(datamodule: Any) -> int:
    """One epoch of ``PreferenceDataModule`` batches; returns the pair count."""
    return sum(len(batch["keys"]) for batch in datamodule.train_dataloader())


def bench_data(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from datamodules.preference import PreferenceDataModule, expand_urls
    from spr_lightning.models import load_processor

    size = "toy" if args.toy else "full"
    shards_dir = write_bench_pairs(tmp / "pairs", args.pairs, image_size=tuple(args.image_size),
                                   samples_per_shard=args.samples_per_shard)
    processor_dir = save_bench_processor(tmp / "processor", size)
    shards = expand_urls(str(shards_dir))
    processor = load_processor(str(processor_dir))
    datamodule = PreferenceDataModule(str(shards_dir), processor_name_or_path=str(processor_dir),
                                      batch_size=args.batch_size, max_length=4096, shuffle_buffer=0, num_workers=0)
    datamodule.setup("fit")
    counts = {"bare_decode": bare_decode(shards, args.batch_size),
              "bare_decode+processor": bare_decode_processor(shards, args.batch_size, processor),
              "preference_datamodule": datamodule_batches(datamodule)}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"providers saw different sample counts: {counts}")
    seconds = interleaved_times({
        "bare_decode": lambda: bare_decode(shards, args.batch_size),
        "bare_decode+processor": lambda: bare_decode_processor(shards, args.batch_size, processor),
        "preference_datamodule": lambda: datamodule_batches(datamodule),
    }, args.repeats, warmup=0)
    pairs = counts["bare_decode"]
    return {"pairs": pairs, "shards": len(shards), "seconds": seconds,
            "samples_per_s": {k: pairs / statistics.median(v) for k, v in seconds.items()},
            "best_samples_per_s": {k: pairs / min(v) for k, v in seconds.items()}}


# ---------------------------------------------------------------------------------------------- part 2: scoring
def scoring_inputs(queries: int, candidates: int, seed: int = 0) -> dict[str, Any]:
    """Images, regions, 1.5x crop boxes and candidate texts; GT/predicted box sets per candidate."""
    from PIL import Image

    from spr_lightning.tiny.corpus import COLORS, OBJECTS, SPATIAL

    rng = random.Random(seed)
    images, regions, crops, texts = [], [], [], []
    for _ in range(queries):
        images.append(Image.new("RGB", (640, 480), tuple(rng.randint(0, 255) for _ in range(3))))
        x1, y1 = rng.uniform(0, 400), rng.uniform(0, 300)
        w, h = rng.uniform(60, 220), rng.uniform(60, 170)
        regions.append((x1, y1, x1 + w, y1 + h))
        cx, cy = x1 + w / 2, y1 + h / 2
        crops.append((max(0.0, cx - 0.75 * w), max(0.0, cy - 0.75 * h), min(640.0, cx + 0.75 * w),
                      min(480.0, cy + 0.75 * h)))
        texts.append([f"a {rng.choice(COLORS)} {rng.choice(OBJECTS)} on the {rng.choice(SPATIAL)} of the "
                      f"{rng.choice(OBJECTS)}" for _ in range(candidates)])
    gt_sets, pred_sets = [], []
    for _ in range(queries * candidates):
        gt = [_random_box(rng) for _ in range(rng.randint(1, 8))]
        # Predictions: jittered copies of some GT boxes plus strays, so thresholded matches exist.
        pred = [_jitter(rng, box) for box in gt if rng.random() < 0.7] + [_random_box(rng) for _ in range(2)]
        gt_sets.append(gt)
        pred_sets.append(pred)
    return {"images": images, "regions": regions, "crops": crops, "texts": texts, "gt": gt_sets, "pred": pred_sets}


def _random_box(rng: random.Random) -> tuple[float, float, float, float]:
    x1, y1 = rng.uniform(0, 500), rng.uniform(0, 380)
    return x1, y1, x1 + rng.uniform(20, 140), y1 + rng.uniform(20, 100)


def _jitter(rng: random.Random, box: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(v + rng.uniform(-8, 8) for v in box)


def semantic_batched(scorer: Any, data: dict[str, Any]) -> list[Any]:
    return [row["sem"] for row in scorer.score(data["images"], data["regions"], data["crops"], data["texts"])]


def semantic_loop(scorer: Any, data: dict[str, Any]) -> list[Any]:
    """One ``score`` call per candidate: each call encodes its query's crop and full image again."""
    import torch

    out = []
    for image, region, crop, candidates in zip(data["images"], data["regions"], data["crops"], data["texts"]):
        out.append(torch.cat([scorer.score([image], [region], [crop], [[text]])[0]["sem"] for text in candidates]))
    return out


def localization_batched(gt: Any, pred: Any, gt_len: Any, pred_len: Any) -> Any:
    import kernels

    return kernels.localization_score(gt, pred, gt_len, pred_len, backend="torch")


def localization_loop(gt_sets: list[Any], pred_sets: list[Any]) -> Any:
    import torch

    import kernels

    return torch.stack([kernels.localization_score(g, p, backend="torch") for g, p in zip(gt_sets, pred_sets)])


def bench_scoring(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from spr_lightning.scoring import SemanticScorer, pad_box_sets

    data = scoring_inputs(args.queries, args.candidates)
    scorer = SemanticScorer("tiny:open_clip")
    batched_sem, looped_sem = semantic_batched(scorer, data), semantic_loop(scorer, data)
    for a, b in zip(batched_sem, looped_sem):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    gt, gt_len = pad_box_sets(data["gt"])
    pred, pred_len = pad_box_sets(data["pred"])
    gt_sets = [torch.tensor(s, dtype=torch.float32) for s in data["gt"]]
    pred_sets = [torch.tensor(s, dtype=torch.float32) for s in data["pred"]]
    torch.testing.assert_close(localization_batched(gt, pred, gt_len, pred_len), localization_loop(gt_sets, pred_sets))
    seconds = interleaved_times({
        "semantic_batched": lambda: semantic_batched(scorer, data),
        "semantic_loop": lambda: semantic_loop(scorer, data),
        "localization_batched": lambda: localization_batched(gt, pred, gt_len, pred_len),
        "localization_loop": lambda: localization_loop(gt_sets, pred_sets),
    }, args.repeats)
    n = args.queries * args.candidates
    return {"candidates": n, "seconds": seconds, "ms": {k: 1e3 * statistics.median(v) for k, v in seconds.items()},
            "best_ms": {k: 1e3 * min(v) for k, v in seconds.items()}}


# ------------------------------------------------------------------------------------------------------- report
def report(data: dict[str, Any], scoring: dict[str, Any], args: argparse.Namespace, info: dict[str, Any]) -> list[str]:
    """Print both tables; return the targets that were missed."""
    missed = []
    sps, best = data["samples_per_s"], data["best_samples_per_s"]
    print(f"\n# data: {data['pairs']} pairs in {data['shards']} shards, {args.image_size[0]}x{args.image_size[1]} "
          f"JPEGs, batch {args.batch_size}, {'toy' if args.toy else '336 px'} processor, {args.repeats} round(s), "
          f"{args.data_threads} torch thread(s)")
    print(f"# {info}")
    print("| provider | pairs/s median (best) | vs bare_decode | vs bare_decode+processor, median (best) |")
    print("|---|---:|---:|---:|")
    for name, value in sps.items():
        print(f"| {name} | {value:.1f} ({best[name]:.1f}) | {value / sps['bare_decode']:.3f}x | "
              f"{value / sps['bare_decode+processor']:.2f}x ({best[name] / best['bare_decode+processor']:.2f}x) |")
    ratio = sps["preference_datamodule"] / sps["bare_decode+processor"]
    if ratio < TARGETS["preference_datamodule"]:
        missed.append(f"preference_datamodule is {ratio:.2f}x of bare_decode+processor (target ≥ 0.8x)")
    ms, best_ms = scoring["ms"], scoring["best_ms"]
    print(f"\n# scoring: {args.queries} queries x {args.candidates} candidates = {scoring['candidates']}, "
          f"tiny open_clip, {args.repeats} round(s), {args.threads} torch thread(s)")
    print("| stage | batched ms median (best) | per-candidate loop ms median (best) | speed-up median (best) "
          "| target |")
    print("|---|---:|---:|---:|---:|")
    for stage in ("semantic", "localization"):
        batched_ms, loop_ms = ms[f"{stage}_batched"], ms[f"{stage}_loop"]
        speedup = loop_ms / batched_ms
        best_speedup = best_ms[f"{stage}_loop"] / best_ms[f"{stage}_batched"]
        print(f"| {stage} | {batched_ms:.2f} ({best_ms[f'{stage}_batched']:.2f}) | {loop_ms:.2f} "
              f"({best_ms[f'{stage}_loop']:.2f}) | {speedup:.1f}x ({best_speedup:.1f}x) | ≥ {TARGETS[stage]:.0f}x |")
        if speedup < TARGETS[stage]:
            missed.append(f"{stage}: batched is {speedup:.1f}x the loop (target ≥ {TARGETS[stage]:.0f}x)")
    for line in missed:
        print(f"# TARGET MISSED: {line}")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="small sizes and the toy processor (smoke test)")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; median and best are reported")
    parser.add_argument("--data-threads", type=int, default=1,
                        help="torch threads for part 1 (1: what a DataLoader worker gets)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for part 2 (scoring)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.toy:
        args.pairs, args.samples_per_shard, args.image_size = min(args.pairs, 16), 8, [96, 64]
        args.queries, args.candidates = min(args.queries, 4), min(args.candidates, 4)
    import torch

    info = machine_info()
    torch.set_num_threads(args.data_threads)
    with tempfile.TemporaryDirectory(prefix="spr_bench_pipeline_") as tmp:
        data = bench_data(args, Path(tmp))
    torch.set_num_threads(args.threads)
    scoring = bench_scoring(args)
    info["load_at_end"] = [round(x, 2) for x in load_average()]
    missed = report(data, scoring, args, info)
    if args.out:
        write_json(args.out, {"machine": info, "args": vars(args), "data": data, "scoring": scoring,
                              "missed": missed})
    return 0


if __name__ == "__main__":
    sys.exit(main())

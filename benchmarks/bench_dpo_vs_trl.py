"""DPO training throughput and peak memory: ``DPOModule`` vs TRL's ``DPOTrainer`` on the same LLaVA, data and LoRA.

Providers (each in a fresh process, so that its peak RSS is its own; interleaved within each round so that
background load hits all of them alike):

* ``trl``: ``trl.DPOTrainer`` with ``peft_config`` (reference = adapter disabled), ``processing_class=processor``,
  a ``datasets.Dataset`` with ``images``/``prompt``/``chosen``/``rejected`` in conversational format (TRL's vision
  path: images decoded and processed on the fly by ``DataCollatorForVisionPreference``), no precomputed reference,
  no gradient checkpointing and fp32 (TRL's defaults are checkpointing on and bf16; both are turned off so the
  two sides do the same arithmetic), sequential sampling.
* ``concat``: ``DPOModule(forward_mode="concat")`` under a Lightning ``Trainer``, data from
  ``PreferenceDataModule`` (pair shards → ``PreferenceCollator``).
* ``shared_prefix``: ``DPOModule(forward_mode="shared_prefix")``: image + prompt encoded once per pair.
* ``shared_prefix_precomputed``: shared prefix, reference log-probs read from shards written beforehand by
  ``ReferenceLogpsWriter`` (that one-off pass is timed and reported separately).

Same model (``benchmarks/_common.py``: CLIP 336 px / patch 14 = 576 image tokens, Llama decoder hidden 512 x 4
layers, 32k vocabulary), same LoRA (every linear layer of the language model), same pairs in the same order, same
batch size, β = 0.1, sigmoid loss. Throughput is pairs/s over ``--steps`` steps after ``--warmup`` steps, from the
end of one optimizer step to the end of the next (data loading, collation, forward, backward, optimizer and
logging all inside). Step-1 loss and mean chosen/rejected log-probs must agree across providers (policy == reference
at step 1, so the loss is ln 2); the script exits non-zero when they do not.

Usage::

    python benchmarks/bench_dpo_vs_trl.py                      # CPU, 2 threads, batch 2, 1 warm-up + 3 timed, 3 rounds
    python benchmarks/bench_dpo_vs_trl.py --toy --repeats 1 --in-process   # smoke run, tiny model
    python benchmarks/bench_dpo_vs_trl.py --profile trl        # + top torch.profiler ops of the timed steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    build_bench_llava,
    current_rss_mb,
    load_average,
    machine_info,
    peak_rss_mb,
    run_worker,
    write_bench_pairs,
    write_json,
)

PROVIDERS = ("trl", "concat", "shared_prefix", "shared_prefix_precomputed")
TARGETS = {"concat": 1.3, "shared_prefix": 1.6, "shared_prefix_precomputed": 1.8}
BETA = 0.1
LR = 1e-5
MAX_LENGTH = 4096  # above every prompt + completion here: nothing is truncated on either side


# ----------------------------------------------------------------------------------------------- worker side
class Recorder:
    """Step-end timestamps, step-1 statistics, RSS before training and an optional profiler over timed steps."""

    def __init__(self, warmup: int, profile: bool) -> None:
        self.warmup = warmup
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.step1: dict[str, float] = {}
        self.rss_before_train_mb = 0.0
        self.profiler: Any = None
        self.profile = profile

    def train_start(self) -> None:
        self.rss_before_train_mb = current_rss_mb()

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kernels are asynchronous: a step ends when its kernels have run
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.profile and len(self.step_ends) == self.warmup:
            import torch.profiler

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True)
            self.profiler.start()

    def result(self, batch_size: int) -> dict[str, Any]:
        if self.profiler is not None:
            self.profiler.stop()
        first = max(self.warmup - 1, 0)
        timed = self.step_ends[first:]
        seconds = timed[-1] - timed[0]
        steps = len(timed) - 1
        out: dict[str, Any] = {
            "batch_size": batch_size,
            "steps_timed": steps,
            "seconds": seconds,
            "samples_per_s": batch_size * steps / seconds,
            # CPU seconds of all threads of the process per pair: less sensitive than wall time to other processes
            # taking the cores (though spinning OpenMP threads still count).
            "cpu_s_per_sample": (self.cpu_ends[-1] - self.cpu_ends[first]) / (batch_size * steps),
            "step_seconds": [b - a for a, b in zip(timed, timed[1:])],
            "step1": self.step1,
            "rss_before_train_mb": self.rss_before_train_mb,
            "peak_rss_mb": peak_rss_mb(),
        }
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if self.profiler is not None:
            events = self.profiler.key_averages()
            # FLOPs of the matmul/conv ops the profiler can count: a load-independent measure of the work per step.
            out["gflop_per_step"] = sum(e.flops for e in events) / 1e9 / steps
            out["profile"] = events.table(sort_by="self_cpu_time_total", row_limit=15)
        return out


def read_pairs(shards: str) -> list[dict[str, Any]]:
    """The pair samples in shard order, images as their original JPEG bytes (no decode yet)."""
    import webdataset as wds

    from datamodules.preference import expand_urls

    return list(wds.WebDataset(expand_urls(shards), shardshuffle=False, empty_check=False).decode())


def trl_dataset(shards: str):
    """A ``datasets.Dataset`` in TRL's conversational vision format, holding the shards' JPEG bytes.

    ``datasets.Image`` decodes them on access, as it does for any image dataset TRL trains on. Message contents
    are strings: TRL's collator (``prepare_multimodal_messages``) puts one ``{"type": "image"}`` block before the
    user text, which renders exactly the conversation ``PreferenceCollator`` renders.
    """
    import datasets

    rows: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for sample in read_pairs(shards):
        record = sample["json"]
        rows["images"].append([{"bytes": sample["jpg"], "path": None}])
        rows["prompt"].append([{"role": "user", "content": record["prompt"]}])
        rows["chosen"].append([{"role": "assistant", "content": record["chosen"]}])
        rows["rejected"].append([{"role": "assistant", "content": record["rejected"]}])
    message = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": message,
                                  "chosen": message, "rejected": message})
    return datasets.Dataset.from_dict(rows, features=features)


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spr_lightning.models import language_model_lora_targets

    recorder = Recorder(args.warmup, args.profile_worker)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            recorder.train_start()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            recorder.step_end()

    class FirstStepDPOTrainer(DPOTrainer):
        """Keeps the unrounded loss and mean log-probs of the first batch (TRL's logs round the loss)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not recorder.step1:
                metrics = self._metrics["train"]
                recorder.step1 = {"loss": float((out[0] if return_outputs else out).detach()),
                                  "logps/chosen": metrics["logps/chosen"][-1],
                                  "logps/rejected": metrics["logps/rejected"][-1]}
            return out

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    dataset = trl_dataset(args.shards)
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                             target_modules=language_model_lora_targets(model))
    with tempfile.TemporaryDirectory(prefix="spr_bench_trl_") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
            precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False, fp16=False,
            logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0,
            train_sampling_strategy="sequential", disable_dropout=True, use_cpu=args.device == "cpu", seed=0,
        )
        trainer = FirstStepDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                                      peft_config=peft_config, callbacks=[Timer()])
        trainer.train()
    return recorder.result(args.batch_size)


def run_dpo_module(args: argparse.Namespace) -> dict[str, Any]:
    from lightning.pytorch import Callback, Trainer

    from datamodules.preference import PreferenceDataModule
    from spr_lightning.dpo import DPOModule

    recorder = Recorder(args.warmup, args.profile_worker)
    forward_mode = "concat" if args.worker == "concat" else "shared_prefix"
    precomputed = args.worker == "shared_prefix_precomputed"

    class Timer(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            recorder.train_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not recorder.step1:
                metrics = trainer.callback_metrics
                recorder.step1 = {"loss": float(outputs["loss"]), "logps/chosen": float(metrics["logps/chosen"]),
                                  "logps/rejected": float(metrics["logps/rejected"])}
            recorder.step_end()

    module = DPOModule(args.model, beta=BETA, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                       lr=LR, forward_mode=forward_mode, use_precomputed_ref=precomputed)
    shards = args.ref_shards if precomputed else args.shards
    data = PreferenceDataModule(shards, processor_name_or_path=args.model, batch_size=args.batch_size,
                                max_length=MAX_LENGTH, shuffle_buffer=0, num_workers=0,
                                samples_per_epoch=args.batch_size * (args.warmup + args.steps))
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                      max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(module, datamodule=data)
    return recorder.result(args.batch_size)


def run_precompute(args: argparse.Namespace) -> dict[str, Any]:
    """The one-off reference pass (``ReferenceLogpsWriter`` → ``ShardWriter``) that ``--ref-shards`` comes from."""
    from lightning.pytorch import Trainer

    from callbacks import ShardWriter
    from datamodules.pairs_predict import PairShardsPredictDataModule
    from spr_lightning.reference import ReferenceLogpsWriter

    start = time.perf_counter()
    writer = ShardWriter(args.ref_shards, prefix="pairs", samples_per_shard=10_000)
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    module = ReferenceLogpsWriter(args.model, max_length=MAX_LENGTH)
    trainer.predict(module, datamodule=PairShardsPredictDataModule(args.shards, batch_size=args.batch_size),
                    return_predictions=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs": writer.samples_written, "peak_rss_mb": peak_rss_mb()}


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runners = {"trl": run_trl, "concat": run_dpo_module, "shared_prefix": run_dpo_module,
               "shared_prefix_precomputed": run_dpo_module, "precompute": run_precompute}
    result = runners[args.worker](args)
    result["provider"] = args.worker
    result["threads"] = torch.get_num_threads()
    write_json(args.worker_json, result)


# ----------------------------------------------------------------------------------------------- parent side
def worker_args(args: argparse.Namespace, provider: str, paths: dict[str, Path], profile: bool = False) -> list[str]:
    out = ["--worker", provider, "--model", str(paths["model"]), "--shards", str(paths["shards"]),
           "--ref-shards", str(paths["ref_shards"]), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
           "--lora-r", str(args.lora_r), "--device", args.device]
    return out + (["--profile-worker"] if profile else [])


def run_provider(args: argparse.Namespace, provider: str, paths: dict[str, Path], profile: bool = False) -> dict:
    """One provider run: a fresh process (default), or this process with ``--in-process`` (smoke runs only:
    peaks then mix providers)."""
    argv = worker_args(args, provider, paths, profile)
    if not args.in_process:
        return run_worker(Path(__file__).resolve(), argv, timeout=args.worker_timeout)
    with tempfile.TemporaryDirectory(prefix="spr_bench_") as tmp:
        out = Path(tmp) / "result.json"
        main(["--worker-json", str(out), *argv])
        return json.loads(out.read_text())


def check_agreement(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Problems with step-1 statistics: loss must be ln 2 everywhere, log-probs equal across providers."""
    problems = []
    base_name = "trl" if "trl" in results else next(iter(results))
    reference = results[base_name][0]["step1"]
    for provider, runs in results.items():
        for run in runs:
            step1 = run["step1"]
            if abs(step1["loss"] - math.log(2)) > 1e-4:
                problems.append(f"{provider}: step-1 loss {step1['loss']:.6f} is not ln 2")
            for key in ("logps/chosen", "logps/rejected"):
                if abs(step1[key] - reference[key]) > 1e-4 * max(1.0, abs(reference[key])):
                    problems.append(f"{provider}: step-1 {key} {step1[key]:.4f} != {base_name} {reference[key]:.4f}")
    return problems


def summarize(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median over rounds per provider; ratios against TRL's medians."""
    rows = []
    for provider, runs in results.items():
        rows.append({
            "provider": provider,
            "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
            "all_samples_per_s": [r["samples_per_s"] for r in runs],
            # Batch size over the median of every timed step of every round: robust to a load spike in one step.
            "samples_per_s_median_step": runs[0]["batch_size"] / statistics.median(
                t for r in runs for t in r["step_seconds"]),
            "cpu_s_per_sample": statistics.median(r["cpu_s_per_sample"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "train_rss_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_train_mb"] for r in runs),
            "cuda_peak_mb": statistics.median(r["cuda_peak_mb"] for r in runs) if "cuda_peak_mb" in runs[0] else None,
            "step1_loss": runs[0]["step1"]["loss"],
            "step1_logps_chosen": runs[0]["step1"]["logps/chosen"],
            "target": TARGETS.get(provider),
        })
    base = next((r for r in rows if r["provider"] == "trl"), None)
    for row in rows:
        if base is not None:
            row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
            row["speedup_median_step"] = row["samples_per_s_median_step"] / base["samples_per_s_median_step"]
            row["cpu_speedup"] = base["cpu_s_per_sample"] / row["cpu_s_per_sample"]
            row["memory_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    cuda = rows[0]["cuda_peak_mb"] is not None
    print("| provider | pairs/s (median of rounds) | per round | vs TRL | target | pairs/s (median step) | vs TRL "
          "| CPU s/pair | vs TRL (CPU time) | peak RSS MiB | vs TRL | RSS growth in training MiB"
          + (" | CUDA peak MiB" if cuda else "") + " | step-1 loss | step-1 mean logps/chosen |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|")
    for row in rows:
        target = f"≥ {row['target']}x" if row["target"] else ""
        rounds = ", ".join(f"{x:.3f}" for x in row["all_samples_per_s"])
        print(f"| {row['provider']} | {row['samples_per_s']:.3f} | {rounds} | {row.get('speedup', 1.0):.2f}x | "
              f"{target} | {row['samples_per_s_median_step']:.3f} | {row.get('speedup_median_step', 1.0):.2f}x | "
              f"{row['cpu_s_per_sample']:.2f} | {row.get('cpu_speedup', 1.0):.2f}x | "
              f"{row['peak_rss_mb']:.0f} | {row.get('memory_ratio', 1.0):.2f}x | {row['train_rss_mb']:.0f} | "
              + (f"{row['cuda_peak_mb']:.0f} | " if cuda else "")
              + f"{row['step1_loss']:.6f} | {row['step1_logps_chosen']:.3f} |")


def prepare_inputs(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """The model and one shard holding exactly the pairs of all steps, in order (no pair is seen twice)."""
    num_pairs = args.batch_size * (args.warmup + args.steps)
    return {"model": build_bench_llava(tmp / "model", "toy" if args.toy else "full"),
            "shards": write_bench_pairs(tmp / "pairs", num_pairs, samples_per_shard=num_pairs),
            "ref_shards": tmp / "pairs_ref"}


def parent_main(args: argparse.Namespace) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    info = machine_info()
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
    with tempfile.TemporaryDirectory(prefix="spr_bench_dpo_") as tmp:
        paths = prepare_inputs(args, Path(tmp))
        precompute = None
        if "shared_prefix_precomputed" in providers:
            precompute = run_provider(args, "precompute", paths)
        for round_index in range(args.repeats):
            for provider in providers:  # interleaved: a load spike hits one round of every provider, not one provider
                result = run_provider(args, provider, paths)
                results[provider].append(result)
                print(f"# round {round_index + 1} {provider}: {result['samples_per_s']:.3f} pairs/s, "
                      f"{result['cpu_s_per_sample']:.2f} CPU s/pair, peak RSS {result['peak_rss_mb']:.0f} MiB, "
                      f"load {info_load()}", flush=True)
        profiled = {p: run_provider(args, p, paths, profile=True) for p in args.profile}
    rows = summarize(results)
    print(f"\n# DPO step, {'toy' if args.toy else 'full'} LLaVA, batch {args.batch_size} pairs, {args.warmup} warm-up "
          f"+ {args.steps} timed steps, {args.repeats} round(s), {args.threads} threads, device {args.device}"
          + (", in one process (peaks mix)" if args.in_process else ""))
    print(f"# {json.dumps(info)}; load at end {info_load()}")
    print_table(rows)
    if precompute is not None:
        print(f"# one-off reference pass for shared_prefix_precomputed: {precompute['seconds']:.1f} s for "
              f"{precompute['pairs']} pairs ({precompute['pairs'] / precompute['seconds']:.3f} pairs/s), "
              f"peak RSS {precompute['peak_rss_mb']:.0f} MiB")
    for provider, run in profiled.items():
        print(f"\n# torch.profiler, {provider}, {run['gflop_per_step']:.1f} GFLOP per step (counted ops), timed steps, "
              f"top ops by self CPU time\n{run['profile']}")
    problems = check_agreement(results)
    for problem in problems:
        print(f"# DISAGREEMENT: {problem}")
    if args.out:
        write_json(args.out, {"machine": info, "args": vars(args), "rows": rows, "results": results,
                              "precompute": precompute, "profiled": profiled, "problems": problems})
    return 1 if problems else 0


def info_load() -> str:
    return "/".join(f"{x:.2f}" for x in load_average())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (SPR: 2 per device)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all providers; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r, as SPR's 128/256)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + str(PROVIDERS))
    parser.add_argument("--profile", nargs="*", default=[], choices=PROVIDERS,
                        help="after the rounds, one more profiled run of these providers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--in-process", action="store_true",
                        help="run providers in this process, not fresh ones (smoke tests; peak memory then mixes)")
    parser.add_argument("--worker-timeout", type=float, default=1800, help="seconds per provider run")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    # worker-only arguments
    parser.add_argument("--worker", default=None, choices=[*PROVIDERS, "precompute"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ref-shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (timing starts at the end of the last warm-up step)")
    if args.worker:
        worker_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())

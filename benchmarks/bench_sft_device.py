"""SFT step time on CPU vs CUDA for the quickstart's small LLaVA and wider language models.

Why: the open lever for issue #11 is a larger language model, whose SFT start takes hours on 2 CPU cores. This
says how long such a start would take on a GPU, measured side by side with the CPU of the same machine.

Builds an SPR-Shapes world and one small LLaVA per language-model shape (the quickstart's 96-px tower, MiniGPT-v2
location tokens, random weights: a step costs what a trained model's does) in a temporary folder, then times full
SFT steps of :class:`spr_lightning.sft.SFTModule` as the quickstart trains them after its first quarter: length-grouped
batches, grounding-attention loss (boxes and phrases, weight 1) on, forward + backward + AdamW, fp32. Batches are
collated beforehand, so data loading is not in the time (it is ~16% of a CPU step in the quickstart, and a
DataLoader worker can hide it on a machine with cores to spare).

For each shape and batch size, one step on every device per round (the same batch), after warm-up steps, so load
hits all alike. Prints a markdown table: median / min ms per step, samples/s, the minutes 20 000 steps would take,
and each provider's speed relative to the first (the CPU, when it is timed). With ``--compile``, every
device is also timed with the decoder under ``torch.compile`` (``DEVICE+compile``); compilation happens in the
warm-up steps, and a batch length not seen before may recompile in a timed one. The providers' first-step losses
(same weights, same batch) must agree to 1e-3, or the script exits.

    python benchmarks/bench_sft_device.py [--shapes 128x2 256x4] [--batch-sizes 16 64] [--devices cpu cuda] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_quickstart_llava, build_shapes_sft_world, machine_info  # noqa: E402

from datamodules.sft import LengthGroupedSampler, SFTCollator, SFTDataset, read_sft_jsonl, sample_lengths  # noqa: E402
from spr_lightning.sft import SFTModule  # noqa: E402

QUICKSTART_STEPS = 20_000


def parse_shape(text: str) -> tuple[int, int]:
    """``"256x4"`` -> (hidden 256, 4 layers)."""
    try:
        hidden, layers = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected HIDDENxLAYERS, e.g. 256x4") from err
    if hidden % 32 or layers < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: hidden must be a multiple of 32, layers >= 1")
    return hidden, layers


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def compile_language_model(module: SFTModule) -> None:
    """``torch.compile`` the decoder (dynamic shapes: grouped batches differ in length); the tower stays eager."""
    inner = module.base_model.model
    inner.language_model = torch.compile(inner.language_model, dynamic=True)


def time_shape(model_dir: Path, records: list[dict[str, Any]], batch_size: int, providers: list[str],
               warmup: int, rounds: int, seed: int) -> dict[str, list[float]]:
    """Per provider (``DEVICE`` or ``DEVICE+compile``), the ms of each timed step, all on the same batches."""
    dataset = SFTDataset(records)
    order = list(LengthGroupedSampler(sample_lengths(records), batch_size, seed=seed))
    steps = warmup + rounds
    if len(order) < steps * batch_size:
        raise SystemExit(f"{len(records)} samples give fewer than {steps} batches of {batch_size}: raise --images")
    setups = {}
    for provider in providers:
        device, _, mode = provider.partition("+")
        torch.manual_seed(seed)
        module = SFTModule(str(model_dir), lora=False, grounding_attention_weight=1.0,
                           grounding_attention_phrase=True, lr=1e-3).to(device)
        if mode == "compile":
            compile_language_model(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        setups[provider] = (device, module, optimizer)
    collator = SFTCollator(next(iter(setups.values()))[1].processor, max_length=512)
    batches = [collator([dataset[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(steps)]
    times: dict[str, list[float]] = {provider: [] for provider in providers}
    first_losses: dict[str, float] = {}
    for step, batch in enumerate(batches):
        for provider, (device, module, optimizer) in setups.items():
            moved = to_device(batch, device)
            synchronize(device)
            start = time.perf_counter()
            loss = module.sft_step(moved)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if step >= warmup:
                times[provider].append(1000 * (time.perf_counter() - start))
            elif step == 0:
                first_losses[provider] = float(loss.detach())
    check_same_loss(first_losses)
    return times


def check_same_loss(first_losses: dict[str, float], rtol: float = 1e-3) -> None:
    """Every provider started from the same weights on the same batch: their first losses must agree."""
    reference = next(iter(first_losses.values()))
    for provider, loss in first_losses.items():
        if abs(loss - reference) > rtol * abs(reference):
            raise SystemExit(f"first-step loss of {provider} is {loss:.6f}, the first provider's {reference:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(128, 2), (256, 4)],
                        help="language models as HIDDENxLAYERS (the quickstart's is 128x2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when there is one")
    parser.add_argument("--compile", action="store_true",
                        help="also time each device with the decoder under torch.compile (dynamic shapes)")
    parser.add_argument("--images", type=int, default=300, help="world train images (7 SFT samples each)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise SystemExit("--devices names cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = [f"{device}{mode}" for device in devices for mode in (("", "+compile") if args.compile else ("",))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records = read_sft_jsonl(build_shapes_sft_world(Path(tmp), args.images))
        for hidden, layers in args.shapes:
            model_dir = build_quickstart_llava(Path(tmp), hidden, layers)
            for batch_size in args.batch_sizes:
                times = time_shape(model_dir, records, batch_size, providers, args.warmup, args.rounds, args.seed)
                rows.append((f"{hidden}x{layers}", batch_size, times))
                medians = ", ".join(f"{name} {statistics.median(ms):.1f} ms" for name, ms in times.items())
                print(f"done {hidden}x{layers} batch {batch_size}: {medians}", flush=True)
    print(f"\n{machine_info()}\nCPU threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} "
          f"warm-up, {len(records)} SFT samples of {args.images} images, fp32\n")
    print(f"| LM | batch | provider | median ms | min ms | samples/s | {QUICKSTART_STEPS} steps, min "
          f"| speed vs {providers[0]} |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for shape, batch_size, times in rows:
        base = statistics.median(times[providers[0]])
        for provider in providers:
            median = statistics.median(times[provider])
            print(f"| {shape} | {batch_size} | {provider} | {median:.1f} | {min(times[provider]):.1f} | "
                  f"{1000 * batch_size / median:.0f} | {QUICKSTART_STEPS * median / 60000:.1f} | "
                  f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()

"""``SFTDataModule``: grounded chat samples from a JSONL file → supervised fine-tuning batches.

Each line is ``{"image": relpath | null, "prompt": str, "answer": str, ...}`` (SPR-Shapes writes
``sft_<split>.jsonl`` in this layout, ``docs/shapes.md``); extra fields (``id``, ``task``, ``boxes``) are kept
but unused. Collation goes through the same functions as DPO's (``datamodules/collate.py``): the same chat
template, image-token expansion and truncation, so the tokens SFT teaches are exactly the tokens DPO later
scores. Labels are ``-100`` everywhere but the assistant's answer and its end-of-turn tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.collate import (
    encode_completions,
    encode_prompts,
    pad_sequences,
    render_prompt_and_completion,
    truncate_completion,
)
from spr_lightning.logprobs import IGNORE_INDEX


def read_sft_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Read and validate an SFT JSONL file.

    Validation happens here, once, before training starts, so a typo on line 40 000 fails in seconds
    with the file and line, not hours into an epoch inside a dataloader worker.

    Args:
        path: the JSONL file (blank lines are skipped).
        image_root: folder that ``image`` paths are relative to; default: the JSONL's own folder.

    Returns:
        Records with ``key`` (the line's ``id``, else ``<file>:<line>``), ``prompt``, ``answer``, ``image`` (an
        absolute path, or ``None`` for a text-only sample) and ``task`` (the line's, else ``None``).

    Raises:
        FileNotFoundError: the file, or an image it names, does not exist.
        ValueError: a line is not a JSON object with string ``prompt`` and ``answer``, or the file is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                records.append(_parse_line(line, f"{path}:{number}", root))
    if not records:
        raise ValueError(f"SFT file {path} has no samples")
    return records


def _parse_line(line: str, where: str, root: Path) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("prompt", "answer"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {record.get(field)!r}")
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError(f"{where}: field 'image' must be a path string or null, got {image!r}")
        image = root / image
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {record['image']!r} not found (looked for {image})")
    key = str(record["id"]) if record.get("id") is not None else where
    return {"key": key, "prompt": record["prompt"], "answer": record["answer"],
            "image": None if image is None else str(image), "task": record.get("task"), "where": where}


class SFTDataset(Dataset):
    """Map-style dataset over validated records; images are opened (RGB) when a sample is read."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = None
        if record["image"] is not None:
            try:
                with Image.open(record["image"]) as img:
                    image = img.convert("RGB")
            except OSError as err:
                raise OSError(f"{record['where']}: cannot read image {record['image']}: {err}") from err
        return {"key": record["key"], "prompt": record["prompt"], "answer": record["answer"], "image": image}


class SFTCollator:
    """Collate ``{"key", "prompt", "answer", "image"}`` samples into one causal-LM batch.

    Rows are prompt then answer, right-padded (as DPO's ``concatenated_inputs`` builds them). Batch keys:
    ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and padding), per-token extras of the
    processor such as Qwen2.5-VL's ``mm_token_type_ids`` (answer and padding tokens get 0), the processor's
    image inputs (``pixel_values``, ``image_grid_thw``, ...), and ``keys``.

    Args:
        processor: the policy's ``AutoProcessor``.
        max_length: maximum prompt + answer tokens; answers are cut from their end (``None``: no limit).
    """

    def __init__(self, processor: Any, max_length: int | None = 2048) -> None:
        self.processor = processor
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [sample["key"] for sample in samples]
        images = [sample.get("image") for sample in samples]
        prompts, answers = [], []
        for sample, image in zip(samples, images):
            prompt_text, answer_text = render_prompt_and_completion(
                self.processor, sample["prompt"], sample["answer"], image is not None)
            prompts.append(prompt_text)
            answers.append(answer_text)
        prompt_ids, per_token, image_inputs = encode_prompts(self.processor, prompts, images)
        answer_ids = [truncate_completion(len(p), a, self.max_length, k)
                      for p, a, k in zip(prompt_ids, encode_completions(self.processor.tokenizer, answers), keys)]
        rows = [torch.cat([p, a]) for p, a in zip(prompt_ids, answer_ids)]
        labels = [torch.cat([torch.full_like(p, IGNORE_INDEX), a]) for p, a in zip(prompt_ids, answer_ids)]
        batch: dict[str, Any] = {
            "keys": keys,
            "input_ids": pad_sequences(rows, self.pad_id),
            "attention_mask": pad_sequences([torch.ones_like(r) for r in rows], 0),
            "labels": pad_sequences(labels, IGNORE_INDEX),
        }
        for name, extras in per_token.items():
            batch[name] = pad_sequences(_extend(extras, answer_ids), 0)
        batch.update(image_inputs)
        return batch


def _extend(extras: list[Tensor], answers: list[Tensor]) -> list[Tensor]:
    """Per-token prompt extras followed by 0 for every answer token (answer tokens are plain text)."""
    return [torch.cat([e, torch.zeros(len(a), dtype=e.dtype)]) for e, a in zip(extras, answers)]


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` that takes its epoch from ``epoch_fn`` (the trainer's ``current_epoch``) each time
    an epoch starts. Lightning's own ``set_epoch`` call passes its count of processed epochs, which after a resume
    from an epoch-end checkpoint is one ahead of the epoch being run, so the resumed run would see the next epoch's
    order (measured with Lightning 2.6; ``tests/test_sft.py`` checks resume against an uninterrupted run)."""

    def __init__(self, *args: Any, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.epoch = self.epoch_fn()
        return super().__iter__()


def sample_lengths(records: list[dict[str, Any]]) -> list[int]:
    """Prompt + answer characters per record: the size :class:`LengthGroupedSampler` groups by (cheap, no
    tokenizer; a fixed-size image adds the same token count to every row)."""
    return [len(r["prompt"]) + len(r["answer"]) for r in records]


class LengthGroupedSampler(DistributedSampler):
    """Shuffled batches of similar length, so padding stops doubling the work (HF ``group_by_length``'s idea).

    Each epoch: a permutation seeded by ``(seed, epoch)``, cut into mega-batches of ``group_size`` global batches
    (``batch_size * num_replicas`` samples), each sorted by ``lengths`` (longest first) and cut into global batches;
    the global batches are then shuffled, and each rank takes every ``num_replicas``-th sample of every global
    batch, so all ranks step through batches of about the same length. The last global batch is filled by
    repeating samples from the start, as ``DistributedSampler`` does, so every rank gets the same count. (It is a
    ``DistributedSampler`` so that Lightning uses it as it is instead of wrapping it in one more split by rank.)

    Batch composition changes with it: on SPR-Shapes a batch is then mostly one task (short REC answers or long
    region descriptions), and the loss (mean over a batch's answer tokens) weighs short-answer batches as much as
    long ones. With a random order a long description dominates its mixed batch's token mean instead.

    Args:
        lengths: a size per sample (any unit; the quickstart uses prompt + answer characters).
        batch_size: samples per batch per rank (the ``DataLoader``'s ``batch_size`` must be the same).
        group_size: global batches per sorted mega-batch; larger groups pad less but order less randomly.
        num_replicas: ranks; ``rank`` this one.
        seed: base of the per-epoch shuffle.
        epoch_fn: returns the epoch each time one starts (see :class:`EpochSampler` for why not ``set_epoch``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, group_size: int = 50, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, epoch_fn: Callable[[], int] | None = None) -> None:
        if batch_size < 1 or group_size < 1:
            raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if not lengths:
            raise ValueError("LengthGroupedSampler needs at least one sample")
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = list(lengths)
        self.batch_size, self.group_size = batch_size, group_size
        self.epoch_fn = epoch_fn
        global_batch = batch_size * num_replicas
        self.num_global_batches = -(-len(self.lengths) // global_batch)

    def __len__(self) -> int:
        return self.num_global_batches * self.batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (every rank's samples), in the order they are stepped through."""
        if self.epoch_fn is not None:
            self.epoch = self.epoch_fn()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_batch = self.batch_size * self.num_replicas
        total = self.num_global_batches * global_batch
        order += (order * (total // len(order) + 1))[: total - len(order)]
        batches = []
        for start in range(0, total, global_batch * self.group_size):
            mega = sorted(order[start : start + global_batch * self.group_size], key=lambda i: -self.lengths[i])
            batches += [mega[k : k + global_batch] for k in range(0, len(mega), global_batch)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in shuffle]

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches():
            yield from batch[self.rank :: self.num_replicas]


class SFTDataModule(LightningDataModule):
    """Grounded chat samples for :class:`spr_lightning.sft.SFTModule`.

    Args:
        train_file: training JSONL (``{"image", "prompt", "answer"}`` per line).
        val_file: optional validation JSONL.
        image_root: folder that ``image`` paths are relative to; default: each JSONL's own folder (SPR-Shapes
            writes ``sft_<split>.jsonl`` at the world root with ``images/...`` paths).
        processor_name_or_path: processor for collation; default: the module's own processor.
        batch_size: samples per batch per device.
        num_workers: dataloader workers per device.
        max_length: maximum prompt + answer tokens; answers are cut from their end, a longer prompt is an error.
        shuffle: shuffle training samples (a permutation per epoch, seeded by ``(seed, epoch)``).
        seed: shuffle seed.
        group_by_length: train on shuffled batches of similar length (:class:`LengthGroupedSampler`; length =
            prompt + answer characters) instead of a plain shuffle: far less padding when answers vary in length
            (on the quickstart's SPR-Shapes mix a random batch is 1.7x its real tokens, a grouped one 1.01x).
        length_group_size: batches per sorted group of :class:`LengthGroupedSampler`.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        image_root: str | None = None,
        processor_name_or_path: str | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        max_length: int | None = 2048,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: bool = False,
        length_group_size: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.collator: SFTCollator | None = None
        self.datasets: dict[str, SFTDataset] = {}

    def _processor(self) -> Any:
        if self.hparams.processor_name_or_path is not None:
            from spr_lightning.models import load_processor

            return load_processor(self.hparams.processor_name_or_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "processor"):
            raise ValueError("SFTDataModule needs processor_name_or_path, or a module with a `processor`")
        return module.processor

    def setup(self, stage: str) -> None:
        if self.collator is None:
            self.collator = SFTCollator(self._processor(), max_length=self.hparams.max_length)
        files = {"train": self.hparams.train_file, "val": self.hparams.val_file}
        for split, file in files.items():
            if file is not None and split not in self.datasets:
                self.datasets[split] = SFTDataset(read_sft_jsonl(file, self.hparams.image_root))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # An explicit distributed sampler (world of 1 without a trainer): the order of an epoch is a function of
        # (seed, epoch) only, so a run resumed at an epoch boundary sees the data an uninterrupted run would.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None and shuffle else None
        dataset, hp = self.datasets[split], self.hparams
        sampler: DistributedSampler
        if shuffle and hp.group_by_length:
            sampler = LengthGroupedSampler(sample_lengths(dataset.records), hp.batch_size,
                                           group_size=hp.length_group_size, num_replicas=world, rank=rank,
                                           seed=hp.seed, epoch_fn=epoch_fn)
        else:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=hp.seed,
                                   epoch_fn=epoch_fn)
        return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=self.collator, persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []
        return self._loader("val", shuffle=False)

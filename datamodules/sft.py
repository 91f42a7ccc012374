"""``SFTDataModule``: grounded chat samples from a JSONL file → supervised fine-tuning batches.

Each line is ``{"image": relpath | null, "prompt": str, "answer": str, ...}`` (SPR-Shapes writes
``sft_<split>.jsonl`` in this layout, ``docs/shapes.md``); extra fields (``id``, ``task``, ``boxes``) are kept
but unused. Collation goes through the same functions as DPO's (``datamodules/collate.py``): the same chat
template, image-token expansion and truncation, so the tokens SFT teaches are exactly the tokens DPO later
scores. Labels are ``-100`` everywhere but the assistant's answer and its end-of-turn tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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
        sampler = EpochSampler(self.datasets[split], num_replicas=world, rank=rank, shuffle=shuffle,
                               seed=self.hparams.seed, epoch_fn=epoch_fn)
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, collate_fn=self.collator,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []
        return self._loader("val", shuffle=False)

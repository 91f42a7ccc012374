"""``PreferenceDataModule``: pair shards → DPO batches, streamed from WebDataset tar shards.

Shards are dealt by rank and dataloader worker, shuffled (shard order, then a sample buffer) with seeds
that depend only on ``(seed, epoch, reader)``, and repeated to a fixed number of samples per reader per
epoch, so every rank runs the same number of steps under DDP, Lightning knows the epoch length, and a
resumed run sees the data an uninterrupted run would have seen (epoch-granular resume).
"""

from __future__ import annotations

import glob
import itertools
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from datamodules.collate import PreferenceCollator
from spr_lightning.shards import (
    ShardFormatError,
    ShardReadErrorHandler,
    list_shards,
    read_manifests,
    validate_record,
)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns, directories (their complete ``pairs`` shards), globs, or any URL WebDataset takes."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            shards = list_shards(path, "pairs") or sorted(str(p) for p in path.glob("*.tar"))
            if not shards:
                raise FileNotFoundError(f"no .tar shards in directory {path}")
            out.extend(shards)
        elif any(ch in item for ch in "*?[") and "://" not in item:
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no shards match {item!r}")
            out.extend(matches)
        else:
            out.extend(wds.shardlists.expand_urls(item))
    return out


def count_samples(shards: list[str]) -> int:
    """Samples in local shards: from manifests where present, else by reading tar headers."""
    total = 0
    manifest_counts: dict[str, int] = {}
    for directory in {str(Path(s).parent) for s in shards if Path(s).exists()}:
        manifest_counts.update({str(Path(directory) / e["shard"]): e["count"] for e in read_manifests(directory)})
    for shard in shards:
        if shard in manifest_counts:
            total += manifest_counts[shard]
            continue
        if not Path(shard).exists():
            raise ValueError(f"cannot count samples of remote shard {shard}; set samples_per_epoch")
        with tarfile.open(shard) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total




def _reader_slot() -> tuple[int, int, int, int]:
    """``(rank, world, worker, workers)`` of the current reader."""
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_DECODE = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])


def _decode_pair(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode one raw pair sample and check its schema; every error names the shard and the key."""
    where, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    # A member cut off by a truncated shard shows up as a sample missing its json or image.
    if "json" not in sample:
        raise ShardFormatError(f"{where}: sample {key!r} has no json (is the shard truncated or corrupt?)")
    if not any(ext in sample for ext in IMAGE_KEYS):
        raise ShardFormatError(
            f"{where}: sample {key!r} has no image ({'/'.join(IMAGE_KEYS)}; is the shard truncated or corrupt?)")
    try:
        sample = _DECODE(sample)
    except Exception as error:  # webdataset's DecodingError has an empty message: say what failed
        cause = error.__cause__ or error
        raise ShardFormatError(f"{where}: sample {key!r}: cannot decode ({type(cause).__name__}: {cause})") from error
    sample["json"] = validate_record("pairs", sample["json"], shard=where, key=key)
    return sample


class PairStream(IterableDataset):
    """Pair samples of one epoch for the current (rank, worker).

    Shards are dealt to readers (rank-major, then worker) when there are at least as many shards as
    readers; otherwise every reader reads all shards and keeps every n-th sample, so no rank is left
    empty (which would hang DDP). Shard order and the shuffle buffer are seeded by ``(seed, epoch,
    reader)`` only; the buffer never mixes two passes, so an epoch that fits in the data is a
    permutation of it. Passes repeat within an epoch as needed to give exactly ``samples_per_reader``.
    """

    def __init__(self, shards: list[str], samples_per_reader: int, readers: int, *, shuffle: bool,
                 shuffle_buffer: int, seed: int) -> None:
        self.shards = shards
        self.samples_per_reader = samples_per_reader
        self.readers = readers
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_reader * self.readers

    def _one_pass(self, repeat: int, slot: int, slots: int, split: bool) -> Iterator[dict[str, Any]]:
        """One pass over this reader's share of the data, shuffled within the pass only."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}-{repeat}").shuffle(order)
        urls = [{"url": url} for url in (order[slot::slots] if split else order)]
        samples = wds.tarfile_to_samples(handler=ShardReadErrorHandler())(iter(urls))
        if not split:
            samples = (s for i, s in enumerate(samples) if i % slots == slot)
        if self.shuffle and self.shuffle_buffer > 0:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer,
                                  seed=f"{self.seed}-{self.epoch}-{repeat}-{slot}")(samples)
        return samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = _reader_slot()
        slot, slots = rank * workers + worker, world * workers
        split = len(self.shards) >= slots
        passes = (self._one_pass(repeat, slot, slots, split) for repeat in itertools.count())
        samples = map(_decode_pair, itertools.chain.from_iterable(passes))
        return itertools.islice(samples, self.samples_per_reader)


class EpochLoader(DataLoader):
    """A DataLoader that hands its :class:`PairStream` the trainer's epoch each time an epoch starts
    (before workers copy the dataset), so shuffling is a function of the epoch, also after a resume."""

    def __init__(self, *args: Any, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


class PreferenceDataModule(LightningDataModule):
    """Streams preference-pair shards for :class:`spr_lightning.dpo.DPOModule`.

    Args:
        train_urls: pair shards: a directory written by the scoring stage, a glob, a brace pattern
            (``pairs-r000-{000000..000009}.tar``), or any URL/pipe WebDataset accepts.
        val_urls: optional validation shards.
        processor_name_or_path: processor for collation; default: the policy module's own processor.
        batch_size: pairs per batch per device (SPR: 2).
        num_workers: dataloader workers per device.
        max_length: maximum prompt + completion tokens; completions are cut from their end.
        shuffle_buffer: sample shuffle buffer (0: no sample shuffle).
        samples_per_epoch: global samples per training epoch; default: counted from local shards.
        seed: shard/sample shuffle seed.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        processor_name_or_path: str | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        max_length: int | None = 2048,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.collator: PreferenceCollator | None = None

    def _processor(self) -> Any:
        if self.hparams.processor_name_or_path is not None:
            from spr_lightning.models import load_processor

            return load_processor(self.hparams.processor_name_or_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "processor"):
            raise ValueError("PreferenceDataModule needs processor_name_or_path, or a module with a `processor`")
        return module.processor

    def setup(self, stage: str) -> None:
        if self.collator is None:
            self.collator = PreferenceCollator(self._processor(), max_length=self.hparams.max_length)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, urls: str | list[str], train: bool) -> DataLoader:
        hp = self.hparams
        shards = expand_urls(urls)
        total = hp.samples_per_epoch if (train and hp.samples_per_epoch) else count_samples(shards)
        workers = max(hp.num_workers, 1)
        per_reader = math.ceil(total / (self._world() * workers))
        dataset = PairStream(shards, per_reader, workers, shuffle=train, shuffle_buffer=hp.shuffle_buffer,
                             seed=hp.seed)
        return EpochLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers,
                           collate_fn=self.collator, epoch_fn=self._current_epoch if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_urls is None:
            return []
        return self._loader(self.hparams.val_urls, train=False)

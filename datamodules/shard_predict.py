"""Every sample of some WebDataset shards exactly once, for a ``predict`` pass (scoring, reference log-probs).

Shards are dealt to ranks, then to dataloader workers, when there are at least as many shards as readers;
otherwise every reader reads all shards and keeps every n-th sample. No shuffling, no repetition, no padding
to equal lengths (predict under DDP does not need equal step counts). Keys already in a complete shard of
``skip_done_in`` (the output directory of the same command) are dropped before decoding (resume).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, get_worker_info

from datamodules.preference import expand_urls
from spr_lightning.shards import ShardReadErrorHandler, done_keys, sanitize_key

__all__ = ["ShardPredictDataModule", "collate_samples"]


def collate_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch is the list of samples (images and records of different sizes do not stack)."""
    return list(samples)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardsOfRank:
    """Node splitter: shards ``rank, rank + world, ...`` (picklable, rank fixed when the loader is built)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, urls: Iterable[Any]) -> Iterator[Any]:
        for index, url in enumerate(urls):
            if index % self.world == self.rank:
                yield url


def shards_of_worker(urls: Iterable[Any]) -> Iterator[Any]:
    """Worker splitter: this dataloader worker's share of the rank's shards."""
    worker, workers = _worker()
    for index, url in enumerate(urls):
        if index % workers == worker:
            yield url


def every_shard(urls: Iterable[Any]) -> Iterator[Any]:
    """Splitter that gives every reader all shards (samples are split by :class:`SamplesOfReader`)."""
    yield from urls


class SamplesOfReader:
    """Pipeline stage for few shards: sample ``n`` goes to reader ``n % (world * workers)``."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        for index, sample in enumerate(source):
            if index % slots == slot:
                yield sample


class NotDone:
    """Filter: drop samples whose key (sanitised, as the writer stores it) is already in a complete shard."""

    def __init__(self, done: frozenset[str]) -> None:
        self.done = done

    def __call__(self, sample: dict[str, Any]) -> bool:
        return sanitize_key(sample["__key__"]) not in self.done


class ShardPredictDataModule(LightningDataModule, ABC):
    """Base of the predict-pass datamodules; subclasses say which shards (:meth:`shard_list`) and how a raw
    sample is decoded and checked (:meth:`decoder`, a picklable callable whose errors name shard and key).

    Args:
        urls: shards: a directory written by a stage (its complete shards), a glob, a brace pattern or any
            URL WebDataset accepts; or a list of them.
        batch_size: samples per batch per device.
        num_workers: dataloader workers per device (decoding, JSON parsing).
        skip_done_in: the output directory of a previous run of the same command: samples whose key is in
            one of its complete shards are skipped (resume). ``None``: process everything.
    """

    def __init__(self, urls: str | list[str], batch_size: int = 8, num_workers: int = 0,
                 skip_done_in: str | None = None) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.urls = urls
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_done_in = skip_done_in

    def shard_list(self) -> list[str]:
        """The shard URLs to read."""
        return expand_urls(self.urls)

    @abstractmethod
    def decoder(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The per-sample map applied after key filtering."""

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def dataset(self, rank: int = 0, world: int = 1) -> wds.WebDataset:
        """The sample stream of ``rank`` out of ``world`` (this rank's share, before worker splitting)."""
        shards = self.shard_list()
        by_shard = len(shards) >= world * max(self.num_workers, 1)
        dataset = wds.WebDataset(
            shards,
            shardshuffle=False,
            handler=ShardReadErrorHandler(),
            empty_check=False,  # a rank with no work left (resume) yields nothing instead of raising
            nodesplitter=ShardsOfRank(rank, world) if by_shard else every_shard,
            workersplitter=shards_of_worker if by_shard else every_shard,
        )
        if not by_shard:
            dataset = dataset.compose(SamplesOfReader(rank, world))
        done = done_keys(self.skip_done_in) if self.skip_done_in else set()
        if done:
            dataset = dataset.select(NotDone(frozenset(done)))
        return dataset.map(self.decoder())

    def predict_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(self.dataset(rank, world), batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=collate_samples)

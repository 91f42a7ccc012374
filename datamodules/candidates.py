"""``CandidateDataModule``: candidate shards (stage 1) → batches for :class:`spr_lightning.rewarding.PreferenceBuilder`.

Scoring must see every query exactly once, also under DDP. Lightning inserts no distributed sampler for an
iterable dataset, so the split is done here, with the rank and world size taken from the trainer when the
dataloader is built (never guessed from environment variables inside the worker):

* at least as many shards as readers (ranks × workers): shard ``i`` goes to rank ``i % world``, then to that
  rank's worker ``j % workers`` (shard lists are sorted, so every rank computes the same split);
* fewer shards than readers: every reader opens every shard and keeps sample ``n`` when
  ``n % readers == reader``, so no rank or worker sits idle and none is left with an empty loader.

There is no shuffling, repetition or padding: ranks may end with different batch counts, which prediction
allows (it has no per-step collectives). Keys already written to the pairs output (``skip_done_in``) are
dropped before decoding, so a re-run only scores what is missing. A batch is a list of samples
``{"__key__", "__url__", "json": validated record, "image": PIL RGB, "image_bytes", "image_ext"}``, because
scorers take images and texts, not stacked tensors.

A bad sample (no json, json that does not parse or fails the schema, no image, an image that does not decode or
exceeds ``max_image_pixels``) raises :class:`~spr_lightning.shards.ShardFormatError` naming the shard and the key;
with ``on_error="skip"`` it arrives instead as ``{"__key__", "__url__", "error": message}`` and the scorer counts
and reports it. A shard that cannot be read as a tar (truncated, corrupt, deleted) always raises, naming the
shard: the samples past the damage are unknown, so skipping could not say what was lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, get_worker_info

from datamodules.preference import expand_urls
from datamodules.regions import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, open_rgb_image
from spr_lightning.shards import ShardFormatError, ShardReadErrorHandler, done_keys, list_shards, validate_record

__all__ = ["CandidateDataModule", "candidate_shards", "collate_samples"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def candidate_shards(urls: str | list[str]) -> list[str]:
    """Shard URLs from directories (their complete ``candidates`` shards), globs, brace patterns or URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        complete = list_shards(item, "candidates") if Path(item).is_dir() else []
        out.extend(complete or expand_urls(item))
    return out


def collate_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch is the list of samples (images and records of different sizes do not stack)."""
    return list(samples)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardsOfRank:
    """Node splitter: shards ``rank, rank + world, ...`` (picklable, rank fixed when the loader is built)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, urls: Iterable[Any]) -> Iterator[Any]:
        for index, url in enumerate(urls):
            if index % self.world == self.rank:
                yield url


def _shards_of_worker(urls: Iterable[Any]) -> Iterator[Any]:
    worker, workers = _worker()
    for index, url in enumerate(urls):
        if index % workers == worker:
            yield url


def _every_shard(urls: Iterable[Any]) -> Iterator[Any]:
    yield from urls


class _SamplesOfReader:
    """Pipeline stage for few shards: sample ``n`` goes to reader ``n % (world * workers)``."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        for index, sample in enumerate(source):
            if index % slots == slot:
                yield sample


class _NotDone:
    """Filter: drop samples whose key is already in a complete pairs shard (resume)."""

    def __init__(self, done: frozenset[str]) -> None:
        self.done = done

    def __call__(self, sample: dict[str, Any]) -> bool:
        return sample["__key__"] not in self.done


class _DecodeCandidates:
    """Map: parse and check the record, open the image, keep its original bytes; errors name shard and key.

    The image is decoded to PIL for the scorers, and its encoded bytes are kept (``image_bytes``,
    ``image_ext``) so the pairs shard can store them as they are instead of compressing a JPEG twice.
    """

    def __init__(self, on_error: str = "raise", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        try:
            return self._decode(sample, shard, key)
        except ShardFormatError as err:
            if self.on_error == "raise":
                raise
            return {"__key__": key, "__url__": shard, "error": str(err)}

    def _decode(self, sample: dict[str, Any], shard: str, key: str) -> dict[str, Any]:
        if "json" not in sample:
            raise ShardFormatError(f"{shard}: sample {key!r} has no json")
        try:
            record = json.loads(sample["json"])
        except ValueError as err:
            raise ShardFormatError(f"{shard}: sample {key!r}: json does not parse: {err}") from None
        record = validate_record("candidates", record, shard=shard, key=key)
        ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ShardFormatError(f"{shard}: sample {key!r} has no image ({' or '.join(_IMAGE_EXTS)})")
        try:
            image = open_rgb_image(sample[ext], f"{ext} of {shard}: sample {key!r}", max_pixels=self.max_image_pixels)
        except ImageLoadError as err:
            raise ShardFormatError(str(err)) from None
        return {
            "__key__": key,
            "__url__": shard,
            "json": record,
            "image": image,
            "image_bytes": sample[ext],
            "image_ext": ext,
        }


class CandidateDataModule(LightningDataModule):
    """Streams candidate shards for the scoring stage (``python -m spr_lightning predict``).

    Args:
        urls: candidate shards: a directory written by the generation stage (its complete shards), a glob,
            a brace pattern (``candidates-r000-{000000..000009}.tar``) or any URL WebDataset accepts; or a list.
        batch_size: queries per batch per device; all candidates of a query are scored together.
        num_workers: dataloader workers per device (JPEG decoding, JSON parsing).
        skip_done_in: the pairs output directory of a previous run of the same command: queries whose key is
            in one of its complete shards are skipped (resume). ``None``: score everything.
        on_error: ``"raise"`` on a bad sample (the error names the shard and the key); ``"skip"`` passes it on
            as an error sample, which :class:`~spr_lightning.rewarding.PreferenceBuilder` counts and reports.
        max_image_pixels: sample images with more pixels are bad samples, refused before decoding (see
            :func:`datamodules.regions.open_rgb_image`); ``None``: only PIL's own guard applies.
    """

    def __init__(
        self,
        urls: str | list[str],
        batch_size: int = 8,
        num_workers: int = 0,
        skip_done_in: str | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.urls = urls
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_done_in = skip_done_in
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def dataset(self, rank: int = 0, world: int = 1) -> wds.WebDataset:
        """The sample stream of ``rank`` out of ``world`` (this rank's share, before worker splitting)."""
        shards = candidate_shards(self.urls)
        readers = world * max(self.num_workers, 1)
        by_shard = len(shards) >= readers
        dataset = wds.WebDataset(
            shards,
            shardshuffle=False,
            handler=ShardReadErrorHandler(),
            empty_check=False,  # a rank with no work left (resume) yields nothing instead of raising
            nodesplitter=_ShardsOfRank(rank, world) if by_shard else _every_shard,
            workersplitter=_shards_of_worker if by_shard else _every_shard,
        )
        if not by_shard:
            dataset = dataset.compose(_SamplesOfReader(rank, world))
        done = done_keys(self.skip_done_in) if self.skip_done_in else set()
        if done:
            dataset = dataset.select(_NotDone(frozenset(done)))
        return dataset.map(_DecodeCandidates(self.on_error, self.max_image_pixels))

    def predict_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(
            self.dataset(rank, world),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
        )

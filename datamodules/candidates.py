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
from pathlib import Path
from typing import Any, Literal

from datamodules.preference import expand_urls
from datamodules.regions import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, open_rgb_image
from datamodules.shard_predict import ShardPredictDataModule, collate_samples
from spr_lightning.shards import ShardFormatError, list_shards, validate_record

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


class CandidateDataModule(ShardPredictDataModule):
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
        super().__init__(urls, batch_size, num_workers, skip_done_in)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels

    def shard_list(self) -> list[str]:
        return candidate_shards(self.urls)

    def decoder(self) -> _DecodeCandidates:
        return _DecodeCandidates(self.on_error, self.max_image_pixels)

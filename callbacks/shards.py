"""``ShardWriter``: predictions → WebDataset tar shards, atomically, per rank, resumable."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from spr_lightning.shards import append_manifest, done_keys, next_shard_index, sanitize_key, shard_name

log = logging.getLogger(__name__)


class ShardWriter(BasePredictionWriter):
    """Writes the samples a ``predict_step`` returns into ``<prefix>-r<rank>-<index>.tar`` shards.

    ``predict_step`` returns a list of WebDataset samples: dicts with ``__key__`` and payload entries
    named by extension (``json``: a dict, ``jpg``/``png``: PIL image or bytes, ``txt``: str). Each shard is
    written under a temporary name, fsync'd and renamed when it holds ``samples_per_shard`` samples (or at
    the end), then recorded in the rank's manifest. A key already in a complete shard is never written
    again, so re-running the same command resumes.

    Args:
        output_dir: directory for shards and manifests (created).
        prefix: shard name prefix, e.g. ``candidates`` or ``pairs``.
        samples_per_shard: samples per complete shard.
    """

    def __init__(self, output_dir: str, prefix: str = "candidates", samples_per_shard: int = 1000) -> None:
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.rank = 0
        self._written: set[str] = set()
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._keys: list[str] = []
        self._index = 0
        self.samples_written = 0
        self.duplicates_skipped = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.start(trainer.global_rank)

    def start(self, rank: int = 0) -> ShardWriter:
        """Prepare to write as ``rank`` (called by ``setup``; call it directly to write without a Trainer)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.output_dir, os.W_OK):
            raise PermissionError(f"ShardWriter: output directory {self.output_dir} is not writable")
        self.rank = rank
        self._written = done_keys(self.output_dir)
        self._index = next_shard_index(self.output_dir, self.prefix, self.rank)
        return self

    def finish(self) -> None:
        """Close the open shard (called at the end of ``predict``)."""
        self._close()

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        for sample in prediction or []:
            self.write_sample(sample)

    def write_sample(self, sample: dict[str, Any]) -> None:
        """Append one sample to the open shard (opening/closing shards as needed)."""
        key = sanitize_key(sample["__key__"])
        if key in self._written:
            self.duplicates_skipped += 1
            return
        if self._tar is None:
            self._open()
        self._tar.write({**sample, "__key__": key})
        self._keys.append(key)
        self._written.add(key)
        self.samples_written += 1
        if len(self._keys) >= self.samples_per_shard:
            self._close()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finish()
        if self.duplicates_skipped:
            log.info("ShardWriter rank %d: skipped %d samples already written", self.rank, self.duplicates_skipped)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Complete samples written so far are kept: close the shard the normal way.
        self._close()

    def _open(self) -> None:
        name = shard_name(self.prefix, self.rank, self._index)
        self._tmp_path = self.output_dir / f".{name}.tmp"
        self._tar = wds.TarWriter(str(self._tmp_path))

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        name = shard_name(self.prefix, self.rank, self._index)
        os.replace(self._tmp_path, self.output_dir / name)
        _fsync_dir(self.output_dir)
        append_manifest(self.output_dir, self.rank, name, self._keys)
        self._tar, self._tmp_path, self._keys = None, None, []
        self._index += 1


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

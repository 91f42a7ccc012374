"""``ShardWriter``: predictions → WebDataset tar shards, atomically, per rank, resumable."""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from spr_lightning.shards import (
    append_manifest,
    done_keys,
    next_shard_index,
    read_manifests,
    sanitize_key,
    shard_name,
)

log = logging.getLogger(__name__)


class ShardWriter(BasePredictionWriter):
    """Writes the samples a ``predict_step`` returns into ``<prefix>-r<rank>-<index>.tar`` shards.

    ``predict_step`` returns a list of WebDataset samples: dicts with ``__key__`` and payload entries
    named by extension (``json``: a dict, ``jpg``/``png``: PIL image or bytes, ``txt``: str). Each shard is
    written under a temporary name, fsync'd and renamed when it holds ``samples_per_shard`` samples (or at
    the end), then recorded in the rank's manifest. A key already in a complete shard is never written
    again, so re-running the same command resumes.

    Failures (``docs/reliability.md``): a write that fails (disk full, an unencodable sample) discards the open
    shard, whose samples are made again on resume, so a half-written tar is never renamed into place; a crash
    between a rename and its manifest line leaves a complete shard that ``start`` adopts into the manifest; temp
    files a killed run of this rank left behind are removed by ``start``.

    Args:
        output_dir: directory for shards and manifests (created).
        prefix: shard name prefix, e.g. ``candidates`` or ``pairs``.
        samples_per_shard: samples per complete shard.
    """

    def __init__(self, output_dir: str, prefix: str = "candidates", samples_per_shard: int = 1000) -> None:
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or sanitize_key(prefix) != prefix:
            raise ValueError(f"prefix {prefix!r} must be a plain name (letters, digits, '_', '-'): shards are named "
                             "<prefix>-r<rank>-<index>.tar inside output_dir and must never land outside it")
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.rank = 0
        self._written: set[str] = set()
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._keys: list[str] = []
        self._originals: dict[str, str] = {}  # sanitized key -> the key it came from, for this run's writes
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
        self._remove_stale_temp_files()
        self._written = done_keys(self.output_dir)
        self._adopt_unlisted_shards()
        self._index = next_shard_index(self.output_dir, self.prefix, self.rank)
        return self

    def _remove_stale_temp_files(self) -> None:
        """A killed run of this rank leaves its open shard as a hidden temp file: never a shard, delete it."""
        for path in self.output_dir.glob(f".{self.prefix}-r{self.rank:03d}-*.tar.tmp"):
            log.info("ShardWriter rank %d: removing %s left by an interrupted run", self.rank, path.name)
            path.unlink(missing_ok=True)

    def _adopt_unlisted_shards(self) -> None:
        """Record complete shards of this rank that a crash left out of the manifest (killed between the rename
        and the manifest append). Renames happen after fsync, so such a shard is whole; its samples are kept
        instead of being made a second time."""
        listed = {entry["shard"] for entry in read_manifests(self.output_dir)}
        for path in sorted(self.output_dir.glob(f"{self.prefix}-r{self.rank:03d}-*.tar")):
            if path.name in listed:
                continue
            try:
                with tarfile.open(path) as tar:
                    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()))
            except (tarfile.TarError, OSError) as exc:
                log.warning("ShardWriter rank %d: %s is not in the manifest and unreadable (%s); it is ignored",
                            self.rank, path.name, exc)
                continue
            if self._written.intersection(keys):
                log.warning("ShardWriter rank %d: %s is not in the manifest and repeats written keys; it is ignored",
                            self.rank, path.name)
                continue
            append_manifest(self.output_dir, self.rank, path.name, keys)
            self._written.update(keys)
            log.info("ShardWriter rank %d: adopted %s (%d samples) into the manifest", self.rank, path.name, len(keys))

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
        original = str(sample["__key__"])
        key = sanitize_key(original)
        if self._originals.setdefault(key, original) != original:
            # sanitize_key is not one-to-one ("a.1" and "a/1" both give "a_1"): dropping the second sample as a
            # "duplicate" would lose it without a word.
            raise ValueError(f"ShardWriter: sample keys {self._originals[key]!r} and {original!r} both become "
                             f"{key!r} in a file name; make the keys differ in letters, digits, '_' or '-'")
        if key in self._written:
            self.duplicates_skipped += 1
            return
        if self._tar is None:
            self._open()
        try:
            self._tar.write({**sample, "__key__": key})
        except BaseException:
            self._discard()  # the tar may end in half a member: never let it become a shard
            raise
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
        # Complete samples written so far are kept: close the shard the normal way (the original error is what
        # the user must see, so a failure to close is logged, not raised over it).
        try:
            self._close()
        except Exception as exc:
            log.error("ShardWriter rank %d: could not close the open shard after an error (%s); its samples "
                      "will be made again on resume", self.rank, exc)

    def _open(self) -> None:
        name = shard_name(self.prefix, self.rank, self._index)
        self._tmp_path = self.output_dir / f".{name}.tmp"
        self._tar = wds.TarWriter(str(self._tmp_path))

    def _discard(self) -> None:
        """Drop the open shard: close what can be closed, delete the temp file, forget its keys."""
        tar, tmp = self._tar, self._tmp_path
        self._written.difference_update(self._keys)
        self.samples_written -= len(self._keys)
        self._tar, self._tmp_path, self._keys = None, None, []
        if tar is not None:
            try:
                tar.close()
            except Exception:  # the stream is already broken; the file goes anyway
                pass
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._tar is None:
            return
        try:
            self._tar.close()
            with open(self._tmp_path, "rb") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            self._discard()
            raise
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

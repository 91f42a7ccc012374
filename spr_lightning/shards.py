"""Shard schemas, manifests and resume bookkeeping shared by the writers (``callbacks``) and readers
(``datamodules``).

Layout of an output directory written by :class:`callbacks.ShardWriter`::

    <prefix>-r<rank:03d>-<index:06d>.tar     complete shards only (written under a temp name, renamed)
    manifest-r<rank:03d>.jsonl               one line per complete shard: {"shard", "count", "keys"}

A shard is listed in its rank's manifest only after its rename, so the manifest never names a partial
shard; a crash loses at most the shard being written, whose queries are produced again on resume.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_GLOB = "manifest-r*.jsonl"

_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "candidates": ("schema", "query_id", "image_id", "image_size", "region", "prompt", "candidates", "coord_format"),
    "pairs": ("schema", "query_id", "image_id", "image_size", "region", "prompt", "chosen", "rejected", "scores",
              "coord_format"),
}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


class ShardFormatError(ValueError):
    """A shard sample does not match its schema; the message names the shard and the key."""


def sanitize_key(key: str) -> str:
    """A WebDataset ``__key__`` that is safe as a file-name stem: no dots (WebDataset splits keys at the
    first dot), no path separators (a key must never escape the output directory)."""
    cleaned = _KEY_UNSAFE.sub("_", str(key)).strip("_")
    if not cleaned:
        raise ValueError(f"sample key {key!r} has no usable characters")
    return cleaned


def validate_record(kind: str, record: Any, *, shard: str = "?", key: str = "?") -> dict[str, Any]:
    """Check one decoded ``json`` record of a ``candidates`` or ``pairs`` shard; return it unchanged."""
    where = f"{shard}: sample {key!r}"
    if not isinstance(record, Mapping):
        raise ShardFormatError(f"{where}: json must be an object, got {type(record).__name__}")
    schema = record.get("schema")
    if schema != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{where}: schema {schema!r} is not supported (this spr_lightning reads schema {SCHEMA_VERSION})"
        )
    missing = [name for name in _REQUIRED_FIELDS[kind] if name not in record]
    if missing:
        raise ShardFormatError(f"{where}: missing field(s) {missing} for a {kind} record")
    if kind == "candidates" and not isinstance(record["candidates"], list):
        raise ShardFormatError(f"{where}: 'candidates' must be a list of strings")
    if kind == "pairs":
        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ShardFormatError(f"{where}: 'chosen' and 'rejected' must be strings")
        if not chosen.strip():
            # A blank rejected answer is a fair negative (the model said nothing); a blank chosen one is not.
            raise ShardFormatError(f"{where}: 'chosen' is blank: a preferred answer must say something")
        if chosen == rejected:
            # DPO's loss is exactly ln 2 with zero gradient on such a pair: a bug upstream, not training data.
            raise ShardFormatError(f"{where}: 'chosen' equals 'rejected', the pair teaches nothing")
    return dict(record)


def shard_name(prefix: str, rank: int, index: int) -> str:
    """File name of shard ``index`` of ``rank``."""
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


def manifest_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / f"manifest-r{rank:03d}.jsonl"


def _is_entry(entry: Any) -> bool:
    """A manifest line as :func:`append_manifest` writes it, naming a file *inside* the directory: a line that
    names ``../x`` or an absolute path (hand-edited, or another tool's file) is never followed by a reader."""
    if not isinstance(entry, dict) or not isinstance(entry.get("keys"), list):
        return False
    shard = entry.get("shard")
    return isinstance(shard, str) and shard == Path(shard).name and shard not in ("", ".", "..")


def read_manifests(output_dir: str | Path) -> list[dict[str, Any]]:
    """All complete-shard entries of all ranks whose shard file exists (a torn last line is ignored, and so is
    an entry whose shard was deleted: deleting a damaged shard and re-running its stage re-makes its samples)."""
    entries: list[dict[str, Any]] = []
    for path in sorted(Path(output_dir).glob(MANIFEST_GLOB)):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-append; its shard is adopted or re-made on resume
            if _is_entry(entry) and (Path(output_dir) / entry["shard"]).is_file():
                entries.append(entry)
    return entries


def done_keys(output_dir: str | Path) -> set[str]:
    """Keys already written to complete shards under ``output_dir`` (empty if it does not exist)."""
    if not Path(output_dir).is_dir():
        return set()
    return {key for entry in read_manifests(output_dir) for key in entry["keys"]}


def list_shards(output_dir: str | Path, prefix: str) -> list[str]:
    """Paths of the complete shards of ``prefix`` under ``output_dir``, in name order."""
    names = {entry["shard"] for entry in read_manifests(output_dir) if entry["shard"].startswith(prefix + "-")}
    return [str(Path(output_dir) / name) for name in sorted(names)]


def append_manifest(output_dir: str | Path, rank: int, shard: str, keys: Iterable[str]) -> None:
    """Record a complete shard; fsync'd so a manifest line never outlives a lost shard."""
    keys = list(keys)
    line = json.dumps({"shard": shard, "count": len(keys), "keys": keys}) + "\n"
    path = manifest_path(output_dir, rank)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line  # a crash cut the last line: end it, or this entry would be glued onto it
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def next_shard_index(output_dir: str | Path, prefix: str, rank: int) -> int:
    """First unused shard index of ``rank`` (resumed runs append, never overwrite)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-r{rank:03d}-(\d{{6}})\.tar$")
    indices = [int(m.group(1)) for p in Path(output_dir).glob(f"{prefix}-r{rank:03d}-*.tar")
               if (m := pattern.match(p.name))]
    return max(indices, default=-1) + 1


def tar_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a WebDataset tar, in order (keys end at the first dot)."""
    current, members = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if current is not None:
        yield current, members


class ShardReadErrorHandler:
    """WebDataset ``handler`` for shard-level failures (open, tar expansion): re-raise naming the shard."""

    def __call__(self, exn: Exception) -> bool:
        # WebDataset appends the stream and the url to a tar error's args; an open error names its file.
        url = getattr(exn, "filename", None) or next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), "?")
        reason = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else exn)
        raise ShardFormatError(
            f"{url}: cannot read this shard ({type(exn).__name__}: {reason}); it is truncated, corrupt or gone. "
            "Delete it and re-run the stage that wrote it: its manifest entry is then ignored and its samples "
            "are made again"
        ) from exn

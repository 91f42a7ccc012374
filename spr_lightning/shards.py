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
from collections.abc import Iterable, Mapping
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
    if kind == "pairs" and not (isinstance(record["chosen"], str) and isinstance(record["rejected"], str)):
        raise ShardFormatError(f"{where}: 'chosen' and 'rejected' must be strings")
    return dict(record)


def shard_name(prefix: str, rank: int, index: int) -> str:
    """File name of shard ``index`` of ``rank``."""
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


def manifest_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / f"manifest-r{rank:03d}.jsonl"


def read_manifests(output_dir: str | Path) -> list[dict[str, Any]]:
    """All complete-shard entries of all ranks whose shard file exists (a torn last line is ignored)."""
    entries: list[dict[str, Any]] = []
    for path in sorted(Path(output_dir).glob(MANIFEST_GLOB)):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-append; its shard is re-made on resume
            if (Path(output_dir) / entry["shard"]).exists():
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
    with open(manifest_path(output_dir, rank), "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def next_shard_index(output_dir: str | Path, prefix: str, rank: int) -> int:
    """First unused shard index of ``rank`` (resumed runs append, never overwrite)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-r{rank:03d}-(\d{{6}})\.tar$")
    indices = [int(m.group(1)) for p in Path(output_dir).glob(f"{prefix}-r{rank:03d}-*.tar")
               if (m := pattern.match(p.name))]
    return max(indices, default=-1) + 1

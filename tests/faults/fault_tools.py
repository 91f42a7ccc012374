"""Helpers of the fault suite: run a stage as a subprocess and ``kill -9`` it, and check a shard folder the way
a reader sees it (manifest vs tar contents, every key once)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from spr_lightning.shards import list_shards, read_manifests

REPO = Path(__file__).resolve().parents[2]


def subprocess_env() -> dict[str, str]:
    # One intra-op thread: tiny models spend their time in thread hand-offs on a busy 2-core machine.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tar_keys(path: str | Path) -> list[str]:
    """Sample keys of a tar in member order (every member read to the end: a partial tar raises)."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            tar.extractfile(member).read()
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def check_shard_folder(out: Path, prefix: str) -> list[str]:
    """What a reader sees in ``out``: every listed shard whole and holding exactly its manifest keys, no key in
    two shards. Returns all keys (sorted)."""
    entries = [e for e in read_manifests(out) if e["shard"].startswith(prefix + "-")]
    assert len({e["shard"] for e in entries}) == len(entries), "a shard is listed twice"
    keys: list[str] = []
    for entry in entries:
        assert tar_keys(out / entry["shard"]) == entry["keys"], f"{entry['shard']} disagrees with its manifest"
        assert entry["count"] == len(entry["keys"])
        keys += entry["keys"]
    assert len(keys) == len(set(keys)), "a key is in two complete shards"
    assert sorted(list_shards(out, prefix)) == sorted(str(out / e["shard"]) for e in entries)
    return sorted(keys)


def run_and_maybe_kill(cmd: list[str], cwd: Path, out: Path, prefix: str, rng: random.Random, log: Path,
                       kill: bool = True, timeout: float = 300.0) -> int | None:
    """Run ``cmd``; when ``kill``, SIGKILL it at a random moment: mostly a random delay after it has completed a
    new shard (so it dies while writing), sometimes at a random time from its start (while loading). While it
    runs, read what a reader would read, again and again: a partial shard must never be listed.

    Returns:
        The exit code, or ``None`` when it was killed.
    """
    before = len(read_manifests(out)) if out.is_dir() else 0
    after_shard = rng.random() < 0.75
    # Short delays after a new shard: a fast run (idle machine, small fixture) must still be killed mid-way.
    delay = rng.uniform(0.0, 0.3) if after_shard else rng.uniform(1.0, 12.0)
    start, fired_at = time.monotonic(), None
    with open(log, "ab") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n# kill={kill} after_shard={after_shard} delay={delay:.2f}\n".encode())
        handle.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    raise AssertionError(f"{cmd[:4]} did not finish in {timeout} s; see {log}")
                if out.is_dir():
                    check_shard_folder(out, prefix)  # concurrent reader: whole shards only
                if kill and fired_at is None:
                    grown = out.is_dir() and len(read_manifests(out)) > before
                    if not after_shard or grown:
                        fired_at = time.monotonic() + delay if after_shard else start + delay
                if fired_at is not None and time.monotonic() >= fired_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    handle.write(b"# killed\n")
                    return None
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spr_lightning", *args]


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def records(out: Path, prefix: str) -> dict[str, dict]:
    """``{key: json record}`` of every complete shard."""
    found: dict[str, dict] = {}
    for shard in list_shards(out, prefix):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    found[member.name.split(".", 1)[0]] = json.loads(tar.extractfile(member).read())
    return found

"""Helpers shared by the tiny model builders: seeded construction, output folders, folder sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore the caller's RNG state afterwards.

    Random init then depends only on ``seed``, and building a tiny model never perturbs the RNG stream of
    the test or training run that asked for it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def prepare_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and return it as a ``Path``."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dir_size_bytes(path: str | Path) -> int:
    """Total size of all files below ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

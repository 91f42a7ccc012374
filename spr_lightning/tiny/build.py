"""Build every tiny model family, resolve ``tiny:<name>`` specs through a shared on-disk cache, and the CLI."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from spr_lightning.tiny._common import dir_size_bytes, prepare_dir
from spr_lightning.tiny.clip import build_tiny_open_clip
from spr_lightning.tiny.grounding_dino import build_tiny_grounding_dino
from spr_lightning.tiny.llava import build_tiny_llava
from spr_lightning.tiny.qwen import build_tiny_qwen2_5_vl

BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": build_tiny_llava,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "open_clip": build_tiny_open_clip,
    "grounding_dino": build_tiny_grounding_dino,
}
TINY_PREFIX = "tiny:"
# Bump when any tiny recipe changes, so caches built by older code are not silently reused.
TINY_RECIPE_VERSION = 2


def build_all(out_dir: str | Path, *, seed: int = 0, only: Sequence[str] | None = None) -> dict[str, Path]:
    """Build the tiny models into ``out_dir/<name>``.

    Args:
        out_dir: Parent folder; created if missing.
        seed: Seed for every model's random weights.
        only: Subset of :data:`BUILDERS` keys to build; all of them when ``None``.

    Returns:
        ``{name: folder}`` for ``"llava"``, ``"qwen2_5_vl"``, ``"open_clip"``, ``"grounding_dino"`` (or ``only``).
    """
    names = list(BUILDERS) if only is None else list(only)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown tiny model(s) {unknown}; choose from {sorted(BUILDERS)}")
    root = prepare_dir(out_dir)
    return {name: BUILDERS[name](root / name, seed=seed) for name in names}


def default_cache_dir() -> Path:
    """``$SPR_TINY_CACHE`` if set, else ``~/.cache/spr_lightning/tiny``."""
    env = os.environ.get("SPR_TINY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spr_lightning" / "tiny"


def resolve_model_path(spec: str, cache_dir: str | Path | None = None, *, seed: int = 0) -> str:
    """Turn a config's model spec into something ``from_pretrained`` / open_clip can load.

    ``"tiny:<name>"`` builds that tiny model once into ``<cache>/seed<seed>-v<recipe>/<name>`` and returns the
    folder; any other spec (hub id or local path) is returned unchanged. The model is built in a private temp
    folder beside the target and moved into place with one ``os.rename``, so concurrent processes (DDP ranks,
    parallel tests) never see a half-written folder: the first rename wins and the others discard their copy.

    Args:
        spec: ``"tiny:llava"``, ``"tiny:qwen2_5_vl"``, ``"tiny:open_clip"``, ``"tiny:grounding_dino"``, or any other
            string.
        cache_dir: Cache root; defaults to :func:`default_cache_dir`.
        seed: Seed of the tiny model's weights.

    Returns:
        The folder path as a string, or ``spec`` itself.
    """
    if not spec.startswith(TINY_PREFIX):
        return spec
    name = spec[len(TINY_PREFIX) :]
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {spec!r}; choose from {[TINY_PREFIX + n for n in BUILDERS]}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"seed{seed}-v{TINY_RECIPE_VERSION}" / name
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        BUILDERS[name](staging, seed=seed)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spr_lightning.tiny OUT_DIR [--seed N] [--only NAME ...]``: build and print path + size of each."""
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.tiny", description=main.__doc__)
    parser.add_argument("out_dir", type=Path, help="parent folder; each model goes into OUT_DIR/<name>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), help="build only these families")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_all(args.out_dir, seed=args.seed, only=args.only)
    total = 0
    for name, path in paths.items():
        size = dir_size_bytes(path)
        total += size
        print(f"{name:<15} {path}  {size / 1e6:.2f} MB")
    print(f"{'total':<15} {total / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s")
    return 0

"""Test session setup: offline hubs, CPU Triton interpreter, ``gpu`` skipping, shared tiny models."""

from __future__ import annotations

import os

# Nothing may download from a model hub in tests; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster than two fighting (and DDP tests start two processes per run);
# set before torch is imported so that subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `tiny:<family>` specs build into a per-session folder, never into the user's home cache.
if "SPR_TINY_CACHE" not in os.environ:
    import tempfile

    os.environ["SPR_TINY_CACHE"] = tempfile.mkdtemp(prefix="spr_tiny_cache_")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (visibly, never pass) ``gpu`` tests when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder, so CLI runs (config.yaml, lightning_logs/) never litter the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build every tiny model family once per test session; returns ``{name: path}``."""
    from spr_lightning.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny_models"))


def write_pair_shards(out_dir, num_pairs: int = 4, samples_per_shard: int = 2, seed: int = 0):
    """Pair shards in the stage-2 schema: coloured-square images, a grounded chosen answer, a vague
    rejected one. Returns the output directory (readable by ``PreferenceDataModule``)."""
    import random

    from PIL import Image

    from callbacks import ShardWriter
    from spr_lightning.shards import SCHEMA_VERSION

    rng = random.Random(seed)
    colours = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220)), ("yellow", (230, 220, 20))]
    writer = ShardWriter(str(out_dir), prefix="pairs", samples_per_shard=samples_per_shard).start(0)
    for i in range(num_pairs):
        name, rgb = colours[i % len(colours)]
        image = Image.new("RGB", (64, 64), (rng.randint(0, 60),) * 3)
        x1, y1 = rng.randint(0, 20), rng.randint(0, 20)
        image.paste(rgb, (x1, y1, x1 + 30, y1 + 30))
        box = [int(x1 / 64 * 1000), int(y1 / 64 * 1000), int((x1 + 30) / 64 * 1000), int((y1 + 30) / 64 * 1000)]
        record = {
            "schema": SCHEMA_VERSION, "query_id": f"img{i}-0", "image_id": i, "image_size": [64, 64],
            "region": [0, 0, 64, 64], "prompt": "Describe the region [0, 0, 999, 999] in detail.",
            "chosen": f"A {name} square {box} on a dark background.",
            "rejected": "Some shapes.",
            "scores": {"chosen": {"sem": 1.0, "loc": 1.0, "total": 1.0}, "rejected": {"sem": 0.1, "loc": 0.0,
                                                                                       "total": 0.08}},
            "coord_format": "ferret", "source": "test",
        }
        writer.write_sample({"__key__": record["query_id"], "json": record, "jpg": image})
    writer.finish()
    return out_dir


@pytest.fixture
def pair_shards(tmp_path):
    """Four pairs in two shards under ``tmp_path/pairs``."""
    return write_pair_shards(tmp_path / "pairs")

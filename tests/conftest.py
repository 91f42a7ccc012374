"""Test session setup: offline hubs, CPU Triton interpreter, ``gpu`` skipping, shared tiny models."""

from __future__ import annotations

import os

# Nothing may download from a model hub in tests; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (visibly, never pass) ``gpu`` tests when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build every tiny model family once per test session; returns ``{name: path}``."""
    from spr_lightning.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny_models"))

"""Tiny random open_clip ViT, saved in open_clip's own format and loaded through open_clip's real factory.

Two ways to load a built directory, both through ``open_clip``'s own code:

* by name: ``register_tiny_open_clip()`` then
  ``open_clip.create_model_and_transforms(TINY_OPEN_CLIP_NAME, pretrained=str(dir / OPEN_CLIP_WEIGHTS))``
  (what :func:`load_tiny_open_clip` does), exactly as for ``("ViT-B-32", "/path/to/weights.pt")``;
* by folder: ``open_clip.create_model_and_transforms("local-dir:" + str(dir))`` (``open_clip_config.json`` is
  written beside the weights).

The vision tower is a plain ViT with class-token pooling (``pool_type="tok"``, no attentional pooler), like
the CLIP ViTs SPR's semantic scorer uses, so the scorer's local-attention variant of the last block applies.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from spr_lightning.tiny._common import prepare_dir, seeded

TINY_OPEN_CLIP_NAME = "spr-tiny-vit"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
IMAGE_SIZE = 32

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "mlp_ratio": 2.0,
        "patch_size": 8,
    },
    # The text tower keeps open_clip's real 49408-token vocab and 77-token context so the bundled
    # SimpleTokenizer (shipped inside the open_clip wheel, no download) fits it.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": IMAGE_SIZE,
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON via a temp file + ``os.replace`` so concurrent processes never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def register_tiny_open_clip() -> str:
    """Make ``TINY_OPEN_CLIP_NAME`` a model name open_clip knows; idempotent and cheap, so loaders may always call it.

    open_clip only discovers architectures from JSON files, so the config is written (constant content) to a
    per-user temp folder and added with ``open_clip.add_model_config``.

    Returns:
        ``TINY_OPEN_CLIP_NAME``.
    """
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        config_dir = Path(tempfile.gettempdir()) / f"spr_lightning-{getpass.getuser()}" / "open_clip_configs"
        config_path = config_dir / f"{TINY_OPEN_CLIP_NAME}.json"
        _write_json_atomic(config_path, TINY_OPEN_CLIP_CFG)
        open_clip.add_model_config(config_path)
    return TINY_OPEN_CLIP_NAME


def make_tiny_open_clip(seed: int = 0) -> torch.nn.Module:
    """Build the tiny open_clip ``CLIP`` model in memory (eval mode, float32) with seeded random weights."""
    register_tiny_open_clip()
    with seeded(seed):
        model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None)
    return model.eval()


def build_tiny_open_clip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save the tiny open_clip model as ``open_clip_model.safetensors`` + ``open_clip_config.json``.

    Returns:
        The folder, loadable with :func:`load_tiny_open_clip` or open_clip's ``"local-dir:<folder>"``.
    """
    path = prepare_dir(out_dir)
    model = make_tiny_open_clip(seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / OPEN_CLIP_WEIGHTS))
    local_dir_config = {"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    _write_json_atomic(path / OPEN_CLIP_CONFIG, local_dir_config)
    return path


def load_tiny_open_clip(path: str | Path) -> tuple[torch.nn.Module, Any, Any]:
    """Load a built tiny open_clip model through ``open_clip.create_model_and_transforms`` and ``get_tokenizer``.

    Args:
        path: The folder :func:`build_tiny_open_clip` wrote, or the weights file inside it.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode, the eval image transform, and open_clip's
        tokenizer for the registered name.
    """
    weights = Path(path)
    if weights.is_dir():
        weights = weights / OPEN_CLIP_WEIGHTS
    name = register_tiny_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)

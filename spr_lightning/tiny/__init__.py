"""Tiny, seeded, randomly initialised versions of every model family spr_lightning uses.

Each builder writes a folder in the model's real on-disk format (``save_pretrained`` for transformers models,
open_clip's own config + safetensors for CLIP), so the real loading code loads it from a local path exactly as
it loads real weights, with nothing downloaded. Configs name ``"tiny:<family>"`` and call
:func:`resolve_model_path` to get such a folder built once into a shared cache.

The ``make_tiny_*`` functions return the in-memory model (and processor) a builder saves, so tests can check
that what the loaders read back is exactly what was built.
"""

from spr_lightning.tiny.build import (
    BUILDERS,
    TINY_PREFIX,
    TINY_RECIPE_VERSION,
    build_all,
    default_cache_dir,
    main,
    resolve_model_path,
)
from spr_lightning.tiny.clip import (
    OPEN_CLIP_WEIGHTS,
    TINY_OPEN_CLIP_NAME,
    build_tiny_open_clip,
    load_tiny_open_clip,
    make_tiny_open_clip,
    register_tiny_open_clip,
)
from spr_lightning.tiny.grounding_dino import build_tiny_grounding_dino, make_tiny_grounding_dino
from spr_lightning.tiny.llava import build_tiny_llava, make_tiny_llava
from spr_lightning.tiny.qwen import build_tiny_qwen2_5_vl, make_tiny_qwen2_5_vl

__all__ = [
    "BUILDERS",
    "OPEN_CLIP_WEIGHTS",
    "TINY_OPEN_CLIP_NAME",
    "TINY_PREFIX",
    "TINY_RECIPE_VERSION",
    "build_all",
    "build_tiny_grounding_dino",
    "build_tiny_llava",
    "build_tiny_open_clip",
    "build_tiny_qwen2_5_vl",
    "default_cache_dir",
    "load_tiny_open_clip",
    "main",
    "make_tiny_grounding_dino",
    "make_tiny_llava",
    "make_tiny_open_clip",
    "make_tiny_qwen2_5_vl",
    "register_tiny_open_clip",
    "resolve_model_path",
]

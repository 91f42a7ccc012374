"""SPR-Shapes: a small synthetic world of coloured shapes for the end-to-end SPR quickstart.

Images with 9-16 shapes (six kinds, eight colours, small or large) on textured, cluttered backgrounds, some of
them partly occluded, written with COCO detection annotations, a RefCOCO-layout REC split, an MDETR-layout
phrase-grounding split and grounded SFT samples, all from one seed. ``write_world`` is the entry point;
``python -m spr_lightning.shapes OUT_DIR`` the command line. See ``docs/shapes.md``.
"""

from spr_lightning.shapes.scene import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SceneConfig,
    ShapeObject,
    make_scene,
    scene_config,
)
from spr_lightning.shapes.writer import SPLITS, WorldPaths, write_world

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneConfig",
    "ShapeObject",
    "WorldPaths",
    "make_scene",
    "scene_config",
    "write_world",
]

"""A small COCO-layout detection dataset on disk, with real images of drawn shapes.

``write_coco_fixture(dir)`` writes ``annotations.json`` (COCO layout: ``images``, ``annotations`` with
``[x, y, w, h]`` boxes, ``categories``) and one image per entry under ``images/``, PNG and JPEG alternating so
that both decoders are exercised. Every image holds more than eight objects of box area >= 300 px², laid out
on a jittered grid so they barely overlap: every image passes the SPR appendix filters and the region sampler
finds valid regions. Each object is drawn exactly inside its annotated box.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

CATEGORIES = ("circle", "square", "triangle", "bar")
_PALETTE = ((220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 20), (200, 40, 200), (20, 200, 200))


class CocoFixture(NamedTuple):
    """Paths of a written fixture and what it holds."""

    annotations: Path
    image_root: Path
    image_ids: list[int]
    num_objects: dict[int, int]


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    else:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)


def _layout(rng: random.Random, size: tuple[int, int], count: int, cell: int) -> list[tuple[int, int, int, int]]:
    """``count`` boxes (``xyxy`` ints), one per random grid cell, each 20-``cell - 4`` px a side."""
    cols, rows = size[0] // cell, size[1] // cell
    cells = rng.sample(range(cols * rows), count)
    boxes = []
    for c in cells:
        cx, cy = (c % cols) * cell, (c // cols) * cell
        w, h = rng.randint(20, cell - 4), rng.randint(20, cell - 4)
        x, y = cx + rng.randint(0, cell - w), cy + rng.randint(0, cell - h)
        boxes.append((x, y, x + w, y + h))
    return boxes


def write_coco_fixture(
    out_dir: str | Path,
    num_images: int = 3,
    seed: int = 0,
    image_size: tuple[int, int] = (160, 120),
    objects_per_image: tuple[int, int] = (9, 12),
) -> CocoFixture:
    """Write ``num_images`` images with ``objects_per_image`` (inclusive range, > 8) shapes each.

    Args:
        out_dir: folder to write into (created); the JSON is ``out_dir/annotations.json``, images are in
            ``out_dir/images`` and ``file_name`` is relative to that folder.
        num_images: how many images.
        seed: fixes shapes, positions and colours.
        image_size: ``(width, height)``; needs room for ``objects_per_image[1]`` cells of 40x40 px.
        objects_per_image: min and max object count.

    Returns:
        :class:`CocoFixture` with the paths, the image ids and each image's object count.
    """
    cell = 40
    if (image_size[0] // cell) * (image_size[1] // cell) < objects_per_image[1]:
        raise ValueError(f"image_size {image_size} has fewer than {objects_per_image[1]} cells of {cell} px")
    root = Path(out_dir)
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations, counts = [], [], {}
    for i in range(num_images):
        image_id = 1000 + i
        file_name = f"{image_id:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        picture = Image.new("RGB", image_size, (rng.randint(60, 120),) * 3)
        draw = ImageDraw.Draw(picture)
        boxes = _layout(rng, image_size, rng.randint(*objects_per_image), cell)
        for box in boxes:
            category = rng.randrange(len(CATEGORIES))
            _draw_object(draw, CATEGORIES[category], box, rng.choice(_PALETTE))
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
        picture.save(image_root / file_name, **({"quality": 95} if file_name.endswith("jpg") else {}))
        images.append({"id": image_id, "file_name": file_name, "width": image_size[0], "height": image_size[1]})
        counts[image_id] = len(boxes)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CATEGORIES)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return CocoFixture(path, image_root, [img["id"] for img in images], counts)

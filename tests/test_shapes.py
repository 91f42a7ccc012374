"""SPR-Shapes world: annotations pass SPR's filters, REC targets are unique, the eval datamodules read the
files, SFT answers decode to their boxes, and the same seed writes the same bytes.

The checks read the *written files* and judge them with code written here, independent of the generator:
a plain resolver over the COCO attributes for REC, a phrase parser for the captions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spr_lightning.coords import get_codec
from spr_lightning.regions.annotations import filter_annotations, load_annotations
from spr_lightning.shapes import COLORS, SHAPES, SIZES, SceneConfig, make_scene, write_world
from spr_lightning.shapes.__main__ import main, split_counts
from spr_lightning.shapes.captions import listing_caption, noun_phrase
from spr_lightning.shapes.masks import shape_mask
from spr_lightning.shapes.referring import referring_expressions
from spr_lightning.shapes.render import render_scene
from spr_lightning.shapes.scene import Background, Scene, ShapeObject, owner_map

COUNTS = {"train": 3, "val": 5, "test": 3}
WORDS = {**{w: "size" for w in SIZES}, **{w: "color" for w in COLORS}, **{w: "shape" for w in SHAPES}}
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("shapes") / "world", COUNTS, seed=3)


def _coco_objects(world, split: str) -> dict[int, list[dict]]:
    """``{image_id: [{"box": xyxy, "size", "color", "shape", "id"}]}`` from the written COCO file."""
    data = json.loads(world.detection[split].read_text())
    out: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        out[ann["image_id"]].append({"id": ann["id"], "box": [x, y, x + w, y + h], **ann["attributes"]})
    return out


def _description(words: list[str]) -> dict[str, str]:
    attrs = {}
    for word in words:
        word = word[:-1] if word[:-1] in SHAPES else word  # plural shape nouns
        assert word in WORDS, f"unknown word {word!r}"
        attrs[WORDS[word]] = word
    return attrs


def _matches(obj: dict, attrs: dict[str, str]) -> bool:
    return all(obj[k] == v for k, v in attrs.items())


def _centre(obj: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = obj["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def _holds(relation: str, a: dict, b: dict) -> bool:
    """Loose reading: any offset in the right direction counts."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def resolve(expression: str, objects: list[dict]) -> list[dict]:
    """Every object ``expression`` can mean: 'the <desc>' or 'the <desc> <relation> the <desc>'."""
    m = re.fullmatch(r"the ([a-z ]+?)(?: (left of|right of|above|below) the ([a-z ]+))?", expression)
    assert m, f"unparseable expression {expression!r}"
    found = [o for o in objects if _matches(o, _description(m.group(1).split()))]
    if m.group(2) is None:
        return found
    anchors = [o for o in objects if _matches(o, _description(m.group(3).split()))]
    if len(anchors) != 1:
        return found + anchors  # an ambiguous anchor makes the whole expression ambiguous
    return [o for o in found if o is not anchors[0] and _holds(m.group(2), o, anchors[0])]


# ------------------------------------------------------------------------------------------ detection
def test_detection_files_pass_spr_filters(world):
    for split, count in COUNTS.items():
        index = load_annotations(world.detection[split])
        kept = filter_annotations(index)  # SPR: area >= 300, more than eight objects
        assert len(index) == len(kept) == count
        assert kept.num_annotations == index.num_annotations
        for image_id, info in index.images.items():
            objects = index.objects(image_id)
            assert len(objects.labels) > 8
            assert bool((objects.areas >= 300).all())
            boxes = objects.boxes
            assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= info.width).all())
            assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= info.height).all())
            assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
            assert all(_description(label.split()) for label in objects.labels)
            with Image.open(world.image_root / info.file_name) as image:
                assert image.size == (info.width, info.height) == (224, 224)


def test_occlusion_is_recorded_and_bounded(world):
    fractions = [ann["visible_fraction"] for split in COUNTS
                 for ann in json.loads(world.detection[split].read_text())["annotations"]]
    assert min(fractions) >= SceneConfig().min_visible
    assert sum(f < 1.0 for f in fractions) >= 5  # occlusion does happen


def test_region_query_datamodule_reads_detection_file(world):
    from datamodules.regions import RegionQueryDataModule

    dm = RegionQueryDataModule(str(world.detection["val"]), str(world.image_root), coord_format="ferret",
                               templates=["region"], batch_size=2)
    dm.setup("predict")
    assert len(dm.specs) == COUNTS["val"]  # every image kept, one region each
    batch = next(iter(dm.predict_dataloader()))
    assert len(batch) == 2 and batch[0].image.size == (224, 224)


# ------------------------------------------------------------------------------------------------ REC
def test_every_rec_expression_names_exactly_its_target(world):
    refs = json.loads(world.refcoco.read_text())
    objects = {**_coco_objects(world, "train"), **_coco_objects(world, "val"), **_coco_objects(world, "test")}
    kinds = set()
    for ref in refs:
        scene = objects[ref["image_id"]]
        for sentence, kind in zip(ref["sents"], ref["kinds"]):
            found = resolve(sentence, scene)
            assert [o["id"] for o in found] == [ref["ann_id"]], (sentence, ref)
            x, y, w, h = ref["bbox"]
            assert found[0]["box"] == [x, y, x + w, y + h]
            kinds.add(kind)
    assert kinds == {"attribute", "relation"}


def test_relations_refer_to_objects_whose_attributes_are_shared(world):
    """Objects with a twin (same size, colour, shape) are referred to by relation only; every object with a
    unique label is referred to."""
    refs = {ref["ann_id"]: ref for ref in json.loads(world.refcoco.read_text())}
    twins = 0
    for split in COUNTS:
        for scene in _coco_objects(world, split).values():
            for obj in scene:
                shared = sum(_matches(o, {k: obj[k] for k in ("size", "color", "shape")}) for o in scene) > 1
                if not shared:
                    assert obj["id"] in refs
                elif obj["id"] in refs:
                    twins += 1
                    assert set(refs[obj["id"]]["kinds"]) == {"relation"}
    assert twins > 0


def test_hand_built_scene_relations():
    def obj(shape, color, size, x, y):
        side = 40 if size == "large" else 24
        return ShapeObject(shape, color, size, (x, y), side, (x, y, x + side, y + side), COLORS[color])

    objects = [obj("circle", "red", "small", 10, 100), obj("circle", "red", "small", 180, 100),
               obj("square", "green", "large", 90, 90)]
    found = referring_expressions(objects, (224, 224), np.random.default_rng(0), max_relational=5)
    assert [e.text for e in found[0]] == ["the circle left of the square"]
    assert [e.text for e in found[1]] == ["the circle right of the square"]
    assert [e.text for e in found[2]][:2] == ["the square", "the large green square"]
    # Move the right circle level with the square's centre: "right of" no longer singles out either circle.
    objects[1] = obj("circle", "red", "small", 98, 10)
    found = referring_expressions(objects, (224, 224), np.random.default_rng(0), max_relational=5)
    assert "the circle right of the square" not in [e.text for e in found.get(1, [])]
    assert {e.text for e in found[1]} == {"the circle above the square"}


# ------------------------------------------------------------------------------------- eval datamodules
def test_refcoco_datamodule_reads_world(world):
    from datamodules.grounding import RefCOCODataModule

    refs = json.loads(world.refcoco.read_text())
    for split in ("val", "test"):
        mine = [r for r in refs if r["split"] == split]
        dm = RefCOCODataModule(str(world.refcoco), str(world.image_root), split=split, batch_size=4, num_workers=0)
        dm.setup("validate")
        assert len(dm.dataset) == sum(len(r["sents"]) for r in mine) > 0
        expected = {f"{r['id']}-{j}": (s, r["bbox"]) for r in mine for j, s in enumerate(r["sents"])}
        batch = next(iter(dm.val_dataloader()))
        assert len(batch) == 4
        for sample in batch:
            sentence, (x, y, w, h) = expected[sample["key"]]
            assert sample["expression"] == sentence
            assert sample["target"].tolist() == [x, y, x + w, y + h]
            assert sample["image_size"] == (224, 224)


def test_flickr_datamodule_reads_world(world):
    from datamodules.grounding import Flickr30kEntitiesDataModule

    objects = _coco_objects(world, "val")
    dm = Flickr30kEntitiesDataModule(str(world.flickr["val"]), str(world.image_root), batch_size=4, num_workers=0)
    dm.setup("validate")
    assert len(dm.dataset) == 2 * COUNTS["val"]  # two captions per image
    phrases = 0
    for batch in dm.val_dataloader():
        for sample in batch:
            scene = objects[int(sample["key"].split("_")[0])]
            assert 2 <= len(sample["phrases"]) <= 4
            for phrase, targets in zip(sample["phrases"], sample["targets"]):
                number, *words = phrase.lower().split()
                expected = [o["box"] for o in scene if _matches(o, _description(words))]
                assert NUMBERS[number] == len(expected) == targets.shape[0]
                assert sorted(targets.tolist()) == sorted(expected)
                phrases += 1
    assert phrases >= 2 * len(dm.dataset)


# ------------------------------------------------------------------------------------------------ SFT
def _sft(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("coord_format, bin_px", [("ferret", 224 / 1000), ("cogvlm", 224 / 1000),
                                                   ("qwen2_5_vl", 0.5), ("shikra", 224 / 1000)])
def test_sft_answers_decode_to_their_boxes(world, tmp_path, coord_format, bin_px):
    if coord_format == "ferret":
        root = world.root
    else:
        root = write_world(tmp_path, {"train": 2}, coord_format=coord_format).root
    codec = get_codec(coord_format)
    lines = _sft(root / "sft_train.jsonl")
    assert {line["task"] for line in lines} == {"rec", "phrase", "region", "image"}
    for line in lines:
        assert (root / line["image"]).is_file()
        decoded = [g.xyxy for g in codec.decode(line["answer"], tuple(line["image_size"]))]
        assert len(decoded) == len(line["boxes"]) > 0, line
        assert np.abs(np.asarray(decoded) - np.asarray(line["boxes"])).max() <= bin_px + 1e-6, line


def test_sft_prompts_are_what_evaluation_and_generation_ask(world):
    from spr_lightning.evaluation import DEFAULT_PROMPTS, assign_phrase_boxes, join_phrases
    from spr_lightning.regions.geometry import inside_fraction
    from spr_lightning.regions.prompts import DEFAULT_TEMPLATES

    codec = get_codec("ferret")
    objects = _coco_objects(world, "train")
    for line in _sft(world.sft["train"]):
        size, image_id = tuple(line["image_size"]), int(Path(line["image"]).stem)
        scene_boxes = sorted(o["box"] for o in objects[image_id])
        found = codec.decode(line["answer"], size)
        assert (line["region"] is None) == (line["task"] != "region")
        if line["task"] == "rec":
            expression = re.fullmatch(r"Give the bounding box of (.+)\.", line["prompt"]).group(1)
            assert line["prompt"] == DEFAULT_PROMPTS["rec"].format(expression=expression)
            assert [o["box"] for o in resolve(expression, objects[image_id])] == line["boxes"]
        elif line["task"] == "phrase":
            phrases = [g.phrase for g in found]  # read back the way the evaluator reads a model's answer
            asked = re.fullmatch(r"What are the locations of (.+)\?", line["prompt"]).group(1).split(", ")
            assert line["prompt"] == DEFAULT_PROMPTS["phrase"].format(phrases=join_phrases(asked))
            assigned = assign_phrase_boxes(asked, found)
            assert [b for boxes in assigned for b in boxes] == [g.xyxy for g in found], phrases
        elif line["task"] == "region":
            region = line["region"]
            template = DEFAULT_TEMPLATES["region"].text
            assert line["prompt"] == template.format(region=codec.encode(region, size))
            inside = inside_fraction(scene_boxes, region) >= 0.5
            expected = [b for b, keep in zip(scene_boxes, inside.tolist()) if keep]
            assert sorted(line["boxes"]) == expected and len(expected) > 4
        else:
            assert sorted(line["boxes"]) == scene_boxes


# --------------------------------------------------------------------------------------- determinism
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes(world, tmp_path):
    again = write_world(tmp_path / "again", COUNTS, seed=3)
    first, second = _files(world.root), _files(again.root)
    assert first.keys() == second.keys() and len(first) > sum(COUNTS.values())
    assert all(first[k] == second[k] for k in first)
    # An image depends on (seed, split, index) only, not on how many images the world has.
    fewer = _files(write_world(tmp_path / "fewer", {"train": 2}, seed=3).root)
    assert fewer["images/train/000002.jpg"] == first["images/train/000002.jpg"]
    other = write_world(tmp_path / "other", {"train": 2}, seed=4)
    assert _files(other.root)["images/train/000002.jpg"] != first["images/train/000002.jpg"]


@pytest.mark.slow
def test_workers_write_the_same_world(world, tmp_path):
    parallel = write_world(tmp_path / "parallel", COUNTS, seed=3, workers=2)
    assert _files(parallel.root) == _files(world.root)


# ------------------------------------------------------------------------------------ scenes, captions
def test_rendered_pixels_match_the_scene():
    for seed in range(3):
        scene = make_scene(np.random.default_rng(seed))
        pixels = np.asarray(render_scene(scene))
        owner = owner_map(scene)
        for k, obj in enumerate(scene.objects):
            mask = np.zeros_like(owner, dtype=bool)
            x, y = obj.origin
            mask[y : y + obj.side, x : x + obj.side] = shape_mask(obj.shape, obj.side)
            rows, cols = np.nonzero(mask)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == obj.box
            assert round(float((owner == k).sum() / mask.sum()), 4) == obj.visible_fraction
            # Visible pixels are the object's colour inside, its dark outline on the rim of its own shape.
            own = owner == k
            inner = mask.copy()
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
                inner &= np.roll(mask, (dy, dx), (0, 1))
            assert (pixels[own & inner] == np.asarray(obj.rgb)).all()
            assert (pixels[own & ~inner] == np.asarray(obj.rgb) // 2).all() and (own & ~inner).any()


def test_scene_config_checks_and_sizes():
    config = SceneConfig(image_size=(320, 240))
    assert config.size == (320, 240)
    small, large = config.side_range("small"), config.side_range("large")
    assert small[0] >= 20 and large[0] >= 1.4 * small[1]
    scene = make_scene(np.random.default_rng(0), config)
    assert scene.size == (320, 240) and len(scene.objects) >= 9
    assert all(o.box[2] <= 320 and o.box[3] <= 240 and o.box_area >= 400 for o in scene.objects)
    with pytest.raises(ValueError, match="at least 128"):
        SceneConfig(image_size=100)
    with pytest.raises(ValueError, match="min_objects"):
        SceneConfig(min_objects=10, max_objects=9)


def test_noun_phrases_and_listing():
    assert noun_phrase("orange star", 1) == "an orange star"
    assert noun_phrase("small red circle", 3) == "three small red circles"
    bg = Background("stripes", ((100, 100, 100), (120, 120, 120)), 0)
    objs = tuple(ShapeObject("circle", "red", "small", (x, y), 24, (x, y, x + 24, y + 24), COLORS["red"])
                 for x, y in ((100, 10), (10, 100)))
    objs += (ShapeObject("star", "white", "large", (150, 150), 50, (150, 150, 200, 200), COLORS["white"]),)
    caption = listing_caption(Scene(224, 224, bg, objs).objects, [2, 1, 0])
    assert caption.text == "Two small red circles and a large white star."
    assert caption.phrases == ["Two small red circles", "a large white star"]
    assert caption.groups == ((0, 1), (2,))


def test_cli_writes_a_world(tmp_path):
    assert split_counts("small", None) == {"train": 200, "val": 50, "test": 50}
    assert split_counts("full", 100) == {"train": 80, "val": 10, "test": 10}
    assert main([str(tmp_path / "cli"), "--num-images", "3", "--seed", "1", "--coord-format", "qwen2_5_vl"]) == 0
    manifest = json.loads((tmp_path / "cli" / "world.json").read_text())
    assert manifest["num_images"] == {"train": 1, "val": 1, "test": 1}
    assert manifest["coord_format"] == "qwen2_5_vl" and manifest["seed"] == 1
    assert (tmp_path / "cli" / manifest["files"]["refcoco"]).is_file()

"""Prompt templates, rendering and region-query records (SPR §3.1 "Grounded Region Description Generation", Fig. 2)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from spr_lightning.regions import (
    DEFAULT_TEMPLATES,
    PromptTemplate,
    Region,
    RegionObject,
    RegionQuery,
    RegionSampler,
    crop_to_image,
    encode_box_pixels,
    filter_annotations,
    image_to_crop,
    load_annotations,
    make_queries,
    render_prompt,
)

REGION = Region(
    box=(100.0, 50.0, 300.0, 250.0),
    crop_box=(50.0, 0.0, 350.0, 300.0),
    object_indices=(0, 1),
    image_size=(640, 480),
    seed_index=0,
)
OBJECTS = [RegionObject((110.0, 60.0, 200.0, 240.0), "person"), RegionObject((250.0, 200.0, 400.0, 250.0), "dog")]


class Recorder:
    """An ``encode_box`` that records its calls and writes boxes with one decimal."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[float, ...], tuple[float, float]]] = []

    def __call__(self, box: tuple[float, ...], size: tuple[float, float]) -> str:
        self.calls.append((tuple(box), tuple(size)))
        return "<" + ",".join(f"{v:.1f}" for v in box) + ">"


def scene_dataset(num_images: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = rng.randint(500, 900), rng.randint(500, 900)
        images.append({"id": image_id * 10, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for _ in range(rng.randint(3, 20)):  # some images have too few objects and are filtered out
            w, h = rng.uniform(20, 150), rng.uniform(20, 150)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id * 10,
                    "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h],
                    "category_id": rng.randint(1, 3),
                }
            )
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "Traffic_Light"}]
    return {"images": images, "annotations": annotations, "categories": categories}


# ---------------------------------------------------------------------------------------------------- templates


def test_template_validation() -> None:
    with pytest.raises(ValueError, match="unknown placeholders"):
        PromptTemplate("bad", "Describe {area}.")
    with pytest.raises(ValueError, match="uses_objects=True"):
        PromptTemplate("bad", "Describe {region}.", uses_objects=True)
    with pytest.raises(ValueError, match="uses_objects=False"):
        PromptTemplate("bad", "Describe {region}: {objects}.")
    with pytest.raises(ValueError, match="object_format"):
        PromptTemplate("bad", "{region} {objects}", uses_objects=True, object_format="{name}")


def test_default_templates_cover_fig2_variants() -> None:
    """Fig. 2: region box on the full image, the cropped region, object references, and combinations."""
    kinds = {(t.uses_crop, t.uses_objects) for t in DEFAULT_TEMPLATES.values()}
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}
    assert all(name == t.name for name, t in DEFAULT_TEMPLATES.items())
    with pytest.raises(TypeError):
        DEFAULT_TEMPLATES["x"] = DEFAULT_TEMPLATES["region"]  # type: ignore[index]
    for template in DEFAULT_TEMPLATES.values():
        text = render_prompt(template, REGION, OBJECTS).text
        assert "[100, 50, 300, 250]" in text or "[50, 50, 250, 250]" in text
        assert "{" not in text and "}" not in text


def test_encode_box_pixels() -> None:
    assert encode_box_pixels((10.4, 20.6, 30.0, 40.5), (100, 100)) == "[10, 21, 30, 40]"


# ---------------------------------------------------------------------------------------------------- rendering


def test_full_image_prompt_uses_image_coordinates_and_records_template() -> None:
    rec = Recorder()
    template = DEFAULT_TEMPLATES["region_objects"]
    rendered = render_prompt(template, REGION, OBJECTS, rec)
    assert rendered.template_name == "region_objects" and not rendered.uses_crop
    assert rendered.frame_box == (0.0, 0.0, 640.0, 480.0)
    assert rec.calls[0] == (REGION.box, (640.0, 480.0))
    assert "Objects in this region: person <110.0,60.0,200.0,240.0>, dog <250.0,200.0,400.0,250.0>." in rendered.text


def test_crop_prompt_uses_crop_coordinates_clipped_to_the_crop() -> None:
    """§3.1 / appendix: crop prompts show the 1.5x-expanded crop, so their boxes are in crop coordinates."""
    rec = Recorder()
    rendered = render_prompt(DEFAULT_TEMPLATES["crop_objects"], REGION, OBJECTS, rec)
    assert rendered.uses_crop and rendered.frame_box == REGION.crop_box
    (region_local, size), (person, _), (dog, _) = rec.calls
    assert size == (300.0, 300.0)
    assert region_local == (50.0, 50.0, 250.0, 250.0)
    assert person == (60.0, 60.0, 150.0, 240.0)
    assert dog == (200.0, 200.0, 300.0, 250.0)  # x2 = 400 reaches past the crop (350): clipped to 300
    # the answer to a crop prompt maps back to image pixels exactly
    assert crop_to_image([list(region_local)], rendered.frame_box) == [list(REGION.box)]
    assert image_to_crop([list(REGION.box)], rendered.frame_box) == [list(region_local)]


def test_objects_ignored_when_template_does_not_use_them_and_tuples_accepted() -> None:
    rec = Recorder()
    render_prompt(DEFAULT_TEMPLATES["region"], REGION, OBJECTS, rec)
    assert len(rec.calls) == 1
    custom = PromptTemplate(
        "custom", "R={region} O={objects}", uses_objects=True, object_format="{box}:{label}", object_separator="; "
    )
    text = render_prompt(custom, REGION, [((0, 0, 10, 10), "cat"), ((5, 5, 6, 6), "ant")]).text
    assert text == "R=[100, 50, 300, 250] O=[0, 0, 10, 10]:cat; [5, 5, 6, 6]:ant"


# ------------------------------------------------------------------------------------------------ query records


def queries(**kwargs: Any) -> list[RegionQuery]:
    index = filter_annotations(load_annotations(scene_dataset(12)))
    args = {"templates": DEFAULT_TEMPLATES, "queries_per_image": 2, "seed": 3} | kwargs
    return list(make_queries(index, RegionSampler(), **args))


def test_region_query_round_trips_through_json() -> None:
    for query in queries()[:10]:
        record = json.loads(json.dumps(query.to_dict()))
        assert record["schema"] == 1
        assert RegionQuery.from_dict(record) == query
    record = queries()[0].to_dict()
    with pytest.raises(ValueError, match="missing keys \\['prompt'\\]"):
        RegionQuery.from_dict({k: v for k, v in record.items() if k != "prompt"})
    with pytest.raises(ValueError, match="schema 2"):
        RegionQuery.from_dict(record | {"schema": 2})


def test_make_queries_ids_objects_and_templates() -> None:
    index = filter_annotations(load_annotations(scene_dataset(12)))
    result = queries()
    assert result, "the synthetic scenes must give queries"
    assert len({q.query_id for q in result}) == len(result)
    for q in result:
        k = q.region_id.split("-")[1]
        assert q.region_id == f"{q.image_id}-{k}" and q.query_id == f"{q.region_id}-{q.template_name}"
        assert q.image_id in index and q.file_name == index.images[q.image_id].file_name
        objs = index.objects(q.image_id)
        assert [o.label for o in q.objects] == [objs.labels[i] for i in q.region.object_indices]
        assert [list(o.box) for o in q.objects] == [objs.boxes[i].tolist() for i in q.region.object_indices]
        assert len(q.objects) > 4  # §3.1: more than four objects per region
        assert q.uses_crop == DEFAULT_TEMPLATES[q.template_name].uses_crop
        assert q.frame_box == (q.region.crop_box if q.uses_crop else (0.0, 0.0, *map(float, q.image_size)))
    by_region: dict[str, set[str]] = {}
    for q in result:
        by_region.setdefault(q.region_id, set()).add(q.template_name)
    assert all(names == set(DEFAULT_TEMPLATES) for names in by_region.values())


def test_make_queries_is_stable_for_resume_and_sharding() -> None:
    full = queries()
    assert full == queries()
    done = {q.query_id for q in full[:7]}
    assert queries(skip=done) == full[7:]
    # an image's queries do not depend on the other images in the index (shards, subsets)
    index = filter_annotations(load_annotations(scene_dataset(12)))
    last = index.image_ids[-1]
    alone = list(make_queries(index.subset([last]), RegionSampler(), DEFAULT_TEMPLATES, 2, 3))
    assert alone == [q for q in full if q.image_id == last]
    assert queries(seed=4) != full


def test_templates_per_region_draws_without_replacement() -> None:
    one = queries(templates_per_region=1)
    assert len({q.region_id for q in one}) == len(one)
    assert len({q.template_name for q in one}) > 1
    assert one == queries(templates_per_region=1)
    two = queries(templates_per_region=2)
    assert len(two) == 2 * len(one)
    with pytest.raises(ValueError, match="templates_per_region"):
        queries(templates_per_region=6)


def test_make_queries_injects_the_codec_and_rejects_duplicate_names() -> None:
    rec = Recorder()
    crop_queries = queries(templates=[DEFAULT_TEMPLATES["crop"]], encode_box=rec)
    assert all(q.prompt.count("<") == 1 for q in crop_queries)
    sizes = [size for _, size in rec.calls]
    assert sizes == [
        (q.region.crop_box[2] - q.region.crop_box[0], q.region.crop_box[3] - q.region.crop_box[1]) for q in crop_queries
    ]
    with pytest.raises(ValueError, match="unique"):
        queries(templates=[DEFAULT_TEMPLATES["crop"], DEFAULT_TEMPLATES["crop"]])


def test_images_without_a_valid_region_yield_nothing() -> None:
    flat = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 1000, "height": 100}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "bbox": [60.0 * i, 0.0, 40.0, 40.0], "category_id": 1} for i in range(10)
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    index = filter_annotations(load_annotations(flat))
    assert len(index) == 1
    assert list(make_queries(index, RegionSampler(), DEFAULT_TEMPLATES, 3, 0)) == []


def test_make_queries_does_not_use_the_global_rng() -> None:
    torch.manual_seed(0)
    first = queries()
    torch.manual_seed(123)
    random.seed(5)
    assert queries() == first

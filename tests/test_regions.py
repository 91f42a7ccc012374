"""Region growth, crop expansion and crop↔image maps (SPR §3.1 "Region Query Construction", appendix §1)."""

from __future__ import annotations

import random

import pytest
import torch

from spr_lightning.regions import (
    Region,
    RegionSampler,
    aspect_ratio,
    crop_to_image,
    expand_box,
    image_to_crop,
    inside_fraction,
    resize_scale,
)
from spr_lightning.regions.sampler import _nearest


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diagonal(n: int) -> torch.Tensor:
    """``n`` equal squares on a diagonal: each growth step adds exactly one neighbour, aspect stays 1."""
    return torch.tensor([[10.0 * i, 10.0 * i, 10.0 * i + 8, 10.0 * i + 8] for i in range(n)])


# ---------------------------------------------------------------------------------------------- plain references


def ref_fraction(box: list[float], region: list[float]) -> float:
    iw = max(0.0, min(box[2], region[2]) - max(box[0], region[0]))
    ih = max(0.0, min(box[3], region[3]) - max(box[1], region[1]))
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area > 0:
        return iw * ih / area
    inside = box[0] >= region[0] and box[1] >= region[1] and box[2] <= region[2] and box[3] <= region[3]
    return 1.0 if inside else 0.0


def ref_crop(region: list[float], scale: float, width: float, height: float) -> list[float]:
    cx, cy = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2
    hw, hh = (region[2] - region[0]) * scale / 2, (region[3] - region[1]) * scale / 2
    return [max(0.0, cx - hw), max(0.0, cy - hh), min(width, cx + hw), min(height, cy + hh)]


def ref_aspect(box: list[float]) -> float:
    w, h = box[2] - box[0], box[3] - box[1]
    return min(w, h) / max(w, h)


def random_scene(seed: int) -> tuple[list[list[float]], tuple[int, int]]:
    """9-30 boxes of area >= 300 px² (as after filtering) in an image of random size."""
    rng = random.Random(seed)
    width, height = rng.randint(400, 1000), rng.randint(400, 1000)
    boxes = []
    for _ in range(rng.randint(9, 30)):
        w, h = rng.uniform(18, 200), rng.uniform(18, 200)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([x, y, x + w, y + h])
    return boxes, (width, height)


# ------------------------------------------------------------------------------------------------- geometry


def test_inside_fraction_half_is_counted_boundary() -> None:
    """Appendix: object indices use objects with *at least* 50% of their area inside the region."""
    region = [0.0, 0.0, 100.0, 100.0]
    boxes = [[50.0, 0.0, 150.0, 10.0], [51.0, 0.0, 151.0, 10.0], [10.0, 10.0, 20.0, 20.0], [200.0, 0, 210, 10]]
    frac = inside_fraction(boxes, region).tolist()
    assert frac == [0.5, 0.49, 1.0, 0.0]
    # degenerate boxes: inside counts fully, outside not at all
    assert inside_fraction([[5.0, 5.0, 5.0, 9.0], [150.0, 5.0, 150.0, 9.0]], region).tolist() == [1.0, 0.0]


def test_aspect_ratio_short_over_long() -> None:
    assert aspect_ratio([0, 0, 30, 10]) == pytest.approx(1 / 3)
    assert aspect_ratio([0, 0, 10, 40]) == 0.25
    assert aspect_ratio([5, 5, 5, 5]) == 0.0


def test_expand_box_is_one_and_a_half_sides_about_centre() -> None:
    """Appendix: "we slightly expand both sides of the region by 1.5 times before performing the crop"."""
    assert expand_box([100, 100, 200, 140], 1.5, (1000, 1000)) == (75.0, 90.0, 225.0, 150.0)
    # clipped to the image at the corner
    assert expand_box([0, 10, 100, 110], 1.5, (120, 115)) == (0.0, 0.0, 120.0, 115.0)


@pytest.mark.parametrize("scale", [1.0, 2.5, (0.5, 3.0)])
def test_crop_maps_are_exact_inverses(scale: float | tuple[float, float]) -> None:
    crop = (37.5, 12.25, 337.5, 412.25)
    boxes = torch.tensor([[40.0, 20.0, 100.0, 60.0], [0.0, 0.0, 500.0, 500.0], [300.0, 400.0, 337.5, 412.25]])
    local = image_to_crop(boxes, crop, scale)
    sx, sy = (scale, scale) if isinstance(scale, float) else scale
    assert torch.equal(local[0], torch.tensor([2.5 * sx, 7.75 * sy, 62.5 * sx, 47.75 * sy]))
    assert torch.allclose(crop_to_image(local, crop, scale), boxes, rtol=0, atol=1e-12)
    rng = random.Random(0)
    for _ in range(50):
        b = [[rng.uniform(-50, 600) for _ in range(4)] for _ in range(3)]
        back = crop_to_image(image_to_crop(b, crop, scale), crop, scale)
        assert isinstance(back, list)
        assert [v for row in back for v in row] == pytest.approx([v for row in b for v in row], abs=1e-9)


def test_crop_maps_keep_tensor_dtype_and_clip_option() -> None:
    crop = (10.0, 20.0, 110.0, 70.0)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0]], dtype=torch.float32)
    local = image_to_crop(boxes, crop)
    assert local.dtype == torch.float32 and local.tolist() == [[-10.0, -20.0, 40.0, 30.0]]
    clipped = image_to_crop(boxes, crop, scale=2.0, clip=True)
    assert clipped.tolist() == [[0.0, 0.0, 80.0, 60.0]]


def test_resize_scale_maps_crop_corner_to_resized_corner() -> None:
    crop = (10.0, 20.0, 110.0, 70.0)
    s = resize_scale(crop, (336, 336))
    assert image_to_crop([[110.0, 70.0, 110.0, 70.0]], crop, s) == [[336.0, 336.0, 336.0, 336.0]]
    with pytest.raises(ValueError, match="no area"):
        resize_scale((5, 5, 5, 9), (10, 10))


# ------------------------------------------------------------------------------------------------- sampler rules


def test_needs_more_than_four_objects() -> None:
    """§3.1: "expansion stops randomly once more than four objects are involved": 4 objects never suffice."""
    sampler = RegionSampler()
    assert sampler.sample(diagonal(4), (100, 100), gen(0)) is None
    region = sampler.sample(diagonal(5), (100, 100), gen(0))
    assert region is not None and region.object_indices == (0, 1, 2, 3, 4)


def test_growth_stops_at_first_allowed_step_with_stop_prob_one() -> None:
    """§3.1: stopping is allowed as soon as more than four objects are in; with p=1 it stops right there."""
    for seed in range(30):
        region = RegionSampler(stop_prob=1.0).sample(diagonal(12), (200, 200), gen(seed))
        assert region is not None and len(region.object_indices) == 5
        idx = region.object_indices
        assert idx == tuple(range(idx[0], idx[0] + 5))  # contiguous: nearest neighbours, one per step
        assert region.seed_index in idx


def test_growth_never_stops_with_stop_prob_zero() -> None:
    region = RegionSampler(stop_prob=0.0).sample(diagonal(12), (200, 200), gen(3))
    assert region is not None and region.object_indices == tuple(range(12))


def test_random_stop_is_geometric_with_stop_prob() -> None:
    """§3.1 "stops randomly": each allowed step stops with p=0.5, so P(5 objects)=1/2, mean 5 + 1 = 6."""
    counts = [len(RegionSampler().sample(diagonal(30), (400, 400), gen(s)).object_indices) for s in range(400)]
    assert min(counts) == 5
    assert 0.42 < counts.count(5) / len(counts) < 0.58
    assert 5.8 < sum(counts) / len(counts) < 6.25


def test_grows_by_nearest_object_not_a_far_outlier() -> None:
    """Appendix: "we iteratively include the closest objects located outside the current region"."""
    cluster = [[100.0 + 30 * i, 100.0 + 30 * j, 120.0 + 30 * i, 120.0 + 30 * j] for i in range(3) for j in range(2)]
    boxes = torch.tensor([*cluster, [900.0, 900.0, 920.0, 920.0]])
    for seed in range(40):
        region = RegionSampler(stop_prob=1.0).sample(boxes, (1000, 1000), gen(seed))
        assert region is not None
        assert (6 in region.object_indices) == (region.seed_index == 6)


def test_nearest_is_centre_to_region_distance_with_ties_to_region_centre() -> None:
    region = (0.0, 0.0, 100.0, 100.0)
    # centres: (150, 50) is 50 from the box; (50, 120) is 20 from it; (110, 110) is sqrt(200) from it
    centres = torch.tensor([[150.0, 50.0], [50.0, 120.0], [110.0, 110.0]], dtype=torch.float64)
    assert _nearest(centres, region) == 2
    # two centres inside the region (distance 0): the one nearer the region's centre wins
    inside = torch.tensor([[90.0, 90.0], [55.0, 45.0], [150.0, 50.0]], dtype=torch.float64)
    assert _nearest(inside, region) == 1


def test_object_half_inside_counts_without_being_picked() -> None:
    """Appendix: objects with at least 50% of their area in the region are its objects, picked or not."""
    half_in = [44.0, 20.0, 52.0, 28.0]  # exactly half inside the union of the five diagonal squares
    boxes = torch.cat([diagonal(5), torch.tensor([half_in])])
    hits = 0
    for seed in range(20):
        region = RegionSampler(stop_prob=1.0).sample(boxes, (100, 100), gen(seed))
        if region.box == (0.0, 0.0, 48.0, 48.0):
            hits += 1
            assert region.object_indices == (0, 1, 2, 3, 4, 5)
    assert hits > 0


def test_aspect_ratio_must_exceed_one_third_strictly() -> None:
    """Appendix: region short/long side ratio "greater than 1/3"; exactly 1/3 is rejected."""
    row = torch.tensor([[12.0 * i, 0.0, 12.0 * (i + 1), 20.0] for i in range(5)])  # union 60 x 20
    assert RegionSampler().sample(row, (100, 100), gen(0)) is None
    taller = row.clone()
    taller[:, 3] = 21.0
    region = RegionSampler().sample(taller, (100, 100), gen(0))
    assert region is not None and aspect_ratio(region.box) > 1 / 3


def test_bad_aspect_keeps_growing_past_five_objects() -> None:
    """A row of 5 squares is too flat; growth must continue into the second row to fix the aspect ratio."""
    rows = [[12.0 * i, 12.0 * j, 12.0 * i + 10, 12.0 * j + 10] for j in range(2) for i in range(5)]
    for seed in range(20):
        region = RegionSampler(stop_prob=1.0).sample(torch.tensor(rows), (100, 100), gen(seed))
        assert region is not None and aspect_ratio(region.box) > 1 / 3
        assert len(region.object_indices) > 5


def test_retries_other_seeds_when_capped_growth_fails() -> None:
    """A seed in a flat row hits ``max_objects`` with a bad aspect ratio; another seed (the cluster) works."""
    row = [[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(10)]
    cluster = [[1000.0 + 25 * i, 1000.0 + 25 * j, 1020.0 + 25 * i, 1020.0 + 25 * j] for i in range(3) for j in range(2)]
    boxes = torch.tensor(row + cluster)
    one_try = [
        RegionSampler(stop_prob=1.0, max_objects=8, max_aspect_tries=1).sample(boxes, (1100, 1100), gen(s))
        for s in range(40)
    ]
    assert any(r is None for r in one_try)
    assert all(r is None or min(r.object_indices) >= 10 for r in one_try)
    for s in range(40):
        region = RegionSampler(stop_prob=1.0, max_objects=8, max_aspect_tries=16).sample(boxes, (1100, 1100), gen(s))
        assert region is not None and min(region.object_indices) >= 10 and len(region.object_indices) <= 8


def test_without_cap_a_failing_image_is_given_up_at_once() -> None:
    """Uncapped growth from any seed ends at the union of all objects, so one failure means every seed fails."""
    flat = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(10)])
    assert RegionSampler(max_aspect_tries=10).sample(flat, (300, 300), gen(0)) is None


def test_deterministic_for_a_generator_seed() -> None:
    boxes, size = random_scene(7)
    sampler = RegionSampler()
    first = [sampler.sample(boxes, size, gen(s)) for s in range(10)]
    assert first == [sampler.sample(boxes, size, gen(s)) for s in range(10)]
    assert len({r.box for r in first}) > 1


def test_region_round_trips_through_dict() -> None:
    region = RegionSampler().sample(*random_scene(1), gen(1))
    assert Region.from_dict(region.to_dict()) == region
    with pytest.raises(ValueError, match="crop_box"):
        Region.from_dict({k: v for k, v in region.to_dict().items() if k != "crop_box"})


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stop_prob"):
        RegionSampler(stop_prob=1.5)
    with pytest.raises(ValueError, match="max_objects"):
        RegionSampler(max_objects=4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        RegionSampler().sample(torch.zeros(6, 3), (10, 10), gen(0))
    assert RegionSampler().sample(torch.zeros(0, 4), (10, 10), gen(0)) is None


# ------------------------------------------------------------------------------------------------- properties


def check_region(region: Region, boxes: list[list[float]], size: tuple[int, int], max_objects: int | None) -> None:
    box, crop = list(region.box), list(region.crop_box)
    width, height = size
    # §3.1: more than four objects; appendix: aspect ratio > 1/3
    assert len(region.object_indices) > 4
    assert max_objects is None or len(region.object_indices) <= max_objects
    assert ref_aspect(box) > 1 / 3
    # appendix: object indices are exactly the objects with >= 50% of their area inside
    expected = tuple(i for i, b in enumerate(boxes) if ref_fraction(b, box) >= 0.5)
    assert region.object_indices == expected
    assert region.seed_index in region.object_indices
    # the region is a union of object boxes: each edge is the edge of an object lying wholly inside it
    whole = [b for b in boxes if ref_fraction(b, box) == 1.0]
    for k in range(4):
        assert any(b[k] == box[k] for b in whole)
    # appendix: the crop is the region with sides x1.5 about its centre, clipped to the image
    assert crop == pytest.approx(ref_crop(box, 1.5, width, height), rel=0, abs=1e-9)
    assert 0 <= crop[0] <= box[0] and 0 <= crop[1] <= box[1]
    assert box[2] <= crop[2] <= width and box[3] <= crop[3] <= height


@pytest.mark.parametrize("max_objects", [None, 7])
def test_properties_over_300_random_scenes(max_objects: int | None) -> None:
    sampler = RegionSampler(max_objects=max_objects, max_aspect_tries=30)
    found = 0
    for seed in range(300):
        boxes, size = random_scene(seed)
        region = sampler.sample(boxes, size, gen(seed))
        if region is None:
            # only allowed when no region can satisfy the rules: uncapped, that means the union of all boxes fails
            if max_objects is None:
                union = [
                    min(b[0] for b in boxes),
                    min(b[1] for b in boxes),
                    max(b[2] for b in boxes),
                    max(b[3] for b in boxes),
                ]
                assert ref_aspect(union) <= 1 / 3
            continue
        found += 1
        check_region(region, boxes, size, max_objects)
        assert region == sampler.sample(boxes, size, gen(seed))
    assert found >= (295 if max_objects is None else 200)


def ref_nearest_key(boxes: list[list[float]], region: list[float], i: int) -> tuple[float, float, int]:
    cx, cy = (boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2
    dx = max(region[0] - cx, cx - region[2], 0.0)
    dy = max(region[1] - cy, cy - region[3], 0.0)
    rcx, rcy = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2
    return (dx * dx + dy * dy, (cx - rcx) ** 2 + (cy - rcy) ** 2, i)


def ref_grow_eager(boxes: list[list[float]], seed: int) -> list[float] | None:
    """Plain-Python growth with stop_prob=1: nearest centre to the region box, ties to the region centre."""
    region = list(boxes[seed])
    while True:
        inside = [ref_fraction(b, region) >= 0.5 for b in boxes]
        if sum(inside) > 4 and ref_aspect(region) > 1 / 3:
            return region
        outside = [i for i, ok in enumerate(inside) if not ok]
        if not outside:
            return None

        b = boxes[min(outside, key=lambda i, r=region: ref_nearest_key(boxes, r, i))]
        region = [min(region[0], b[0]), min(region[1], b[1]), max(region[2], b[2]), max(region[3], b[3])]


def test_property_eager_growth_matches_plain_python_reference() -> None:
    """§3.1 + appendix end to end: with p=1 the region is the first valid one on the nearest-object path."""
    for seed in range(150):
        boxes, size = random_scene(1000 + seed)
        region = RegionSampler(stop_prob=1.0).sample(boxes, size, gen(seed))
        if region is None:
            continue
        assert list(region.box) == ref_grow_eager(boxes, region.seed_index)

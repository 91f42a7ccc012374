"""Refinement of the preferred description (SPR §3.2 last paragraph, appendix §1)."""

from __future__ import annotations

import pytest

from spr_lightning.coords import get_codec
from spr_lightning.scoring.localization import localization_scores
from spr_lightning.scoring.refine import refine_description

# A 100 x 100 image: Ferret's 0-999 bins are exactly 10 per pixel, so integer pixel boxes survive the text.
SIZE = (100, 100)
FERRET = get_codec("ferret")
REGION = (0.0, 0.0, 60.0, 60.0)
DOG = (10.0, 10.0, 40.0, 40.0)
CAT = (42.0, 5.0, 58.0, 30.0)
TREE = (70.0, 70.0, 95.0, 98.0)  # outside REGION


def _boxes(text, codec=FERRET):
    """Decoded boxes rounded to 1e-6 px: equality below means equal up to float rounding of the decode."""
    return [tuple(round(v, 6) for v in g.xyxy) for g in codec.decode(text, SIZE)]


def test_snapped_boxes_equal_ground_truth_after_decode():
    text = "A dog [120, 90, 410, 400] chases a cat [410, 60, 570, 310] on grass."
    result = refine_description(text, FERRET, SIZE, [DOG, CAT], region=REGION)
    assert _boxes(result.text) == [DOG, CAT]
    assert result.text == "A dog [100, 100, 400, 400] chases a cat [420, 50, 580, 300] on grass."
    assert (result.snapped, result.kept, result.unmatched, result.duplicates) == (2, 0, 0, 0)


def test_unmatched_box_is_removed_and_text_is_otherwise_unchanged():
    text = "A dog [100, 100, 400, 400], a ball [450, 450, 550, 550] and a cat [420, 50, 580, 300]."
    result = refine_description(text, FERRET, SIZE, [DOG, CAT], region=REGION)
    assert result.text == "A dog [100, 100, 400, 400], a ball and a cat [420, 50, 580, 300]."
    assert result.boxes == [DOG, None, CAT]
    assert result.unmatched == 1
    assert FERRET.strip(result.text) == FERRET.strip(text)


def test_keep_unmatched_keeps_the_box_as_written_and_still_snaps_and_dedupes():
    text = ("A dog [120, 90, 410, 400], a ball [450, 450, 550, 550], a cat [420, 50, 580, 300] "
            "and the dog [110, 100, 400, 410].")
    result = refine_description(text, FERRET, SIZE, [DOG, CAT], region=REGION, keep_unmatched=True)
    assert result.text == ("A dog [100, 100, 400, 400], a ball [450, 450, 550, 550], a cat [420, 50, 580, 300] "
                           "and the dog.")
    assert result.boxes[0] == DOG and result.boxes[2] == CAT and result.boxes[3] is None
    assert result.boxes[1] == pytest.approx((45.0, 45.0, 55.0, 55.0))  # the ball, decoded as written
    assert (result.snapped, result.kept, result.unmatched, result.duplicates) == (2, 1, 0, 1)


def test_later_mention_of_the_same_object_is_removed():
    text = "The dog [100, 100, 400, 400] sleeps. That dog [110, 100, 410, 390] is brown."
    result = refine_description(text, FERRET, SIZE, [DOG], region=REGION)
    assert result.text == "The dog [100, 100, 400, 400] sleeps. That dog is brown."
    assert result.duplicates == 1 and result.snapped == 1


def test_duplicates_in_one_group_are_removed_with_their_joiner():
    cogvlm = get_codec("cogvlm")
    text = "two dogs[[100,100,400,400;110,100,400,400]] and a cat[[420,050,580,300]]"
    result = refine_description(text, cogvlm, SIZE, [DOG, CAT], region=REGION)
    assert result.text == "two dogs[[100,100,400,400]] and a cat[[420,050,580,300]]"
    assert _boxes(result.text, cogvlm) == [DOG, CAT]


def test_outside_region_kept_as_written_only_when_it_matches_an_annotation():
    tree_written = (72.0, 70.0, 95.0, 98.0)  # IoU with TREE = 23/25 = 0.92
    text = "A dog [100, 100, 400, 400] under a tree [720, 700, 950, 980] near a car [700, 0, 990, 200]."
    result = refine_description(text, FERRET, SIZE, [DOG], anno_boxes=[DOG, TREE], region=REGION)
    assert result.boxes == [DOG, tree_written, None]
    assert result.text == "A dog [100, 100, 400, 400] under a tree [720, 700, 950, 980] near a car."
    assert (result.snapped, result.kept, result.unmatched) == (1, 1, 1)
    snapped = refine_description(text, FERRET, SIZE, [DOG], anno_boxes=[DOG, TREE], region=REGION, snap_outside=True)
    assert _boxes(snapped.text) == [DOG, TREE]
    # Without annotations, nothing outside the region can be verified: it goes.
    assert refine_description(text, FERRET, SIZE, [DOG], region=REGION).boxes == [DOG, None, None]


def test_outside_box_is_not_snapped_to_region_ground_truth():
    # TREE is in B_gt (say the detector found it on the crop), but the written box lies outside the region:
    # only annotations can confirm it, and there are none.
    text = "A tree [720, 700, 950, 980]."
    assert refine_description(text, FERRET, SIZE, [TREE], region=REGION).text == "A tree."
    assert refine_description(text, FERRET, SIZE, [TREE]).boxes == [TREE]  # no region: everything is inside


def test_overlapping_kept_boxes_are_deduplicated_by_iou():
    # Two different annotations nearly identical (IoU 0.9): a later box on the second is a duplicate.
    near = (10.0, 10.0, 40.0, 43.0)
    text = "A dog [100, 100, 400, 400] and a dog [100, 100, 400, 430]."
    result = refine_description(text, FERRET, SIZE, [DOG, near], region=REGION)
    assert result.boxes == [DOG, None] and result.duplicates == 1
    loose = refine_description(text, FERRET, SIZE, [DOG, near], region=REGION, dedup_iou_threshold=0.95)
    assert loose.boxes == [DOG, near]


def test_match_threshold_is_strict():
    half = (10.0, 10.0, 40.0, 25.0)  # IoU with DOG = 450/900 = 0.5 exactly: not > 0.5
    text = "A dog [100, 100, 400, 250]."
    assert refine_description(text, FERRET, SIZE, [DOG]).boxes == [None]
    assert refine_description(text, FERRET, SIZE, [DOG], match_iou_threshold=0.49).boxes == [DOG]
    assert _boxes(text) == [half]


def test_text_without_boxes_is_returned_unchanged():
    text = "A plain description of a dog."
    result = refine_description(text, FERRET, SIZE, [DOG], region=REGION)
    assert result.text == text and result.boxes == []
    assert refine_description("A dog [100, 100, 400, 400].", FERRET, SIZE, []).text == "A dog."


@pytest.mark.parametrize("fmt", ["qwen2_5_vl", "shikra", "cogvlm"])
def test_refinement_uses_algorithm1_ground_truth_in_other_formats(fmt):
    codec = get_codec(fmt)
    text = f"A dog {codec.encode((12, 11, 41, 39), SIZE)} and a cat {codec.encode((44, 6, 57, 29), SIZE)}."
    loc = localization_scores([_boxes(text, codec)], [[]], [[DOG, CAT]])[0]
    result = refine_description(text, codec, SIZE, loc.gt_boxes, region=REGION)
    assert _boxes(result.text, codec) == _boxes(codec.encode([DOG, CAT], SIZE), codec)  # gt as the format writes it
    assert codec.strip(result.text) == codec.strip(text)

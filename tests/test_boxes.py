"""Plain-box helpers: format conversions (checked against torchvision), ordering, clamping, square padding."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from spr_lightning.boxes import (
    box_area,
    clamp_box,
    convert_box,
    denormalize_box,
    enclosing_box,
    from_square_padded,
    normalize_box,
    order_corners,
    square_pad_geometry,
    to_square_padded,
)

FORMATS = ("xyxy", "xywh", "cxcywh")


@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_convert_matches_torchvision(in_fmt, out_fmt):
    box = (10.0, 20.0, 30.0, 60.0)
    expected = box_convert(torch.tensor([box], dtype=torch.float64), in_fmt, out_fmt)[0].tolist()
    assert convert_box(box, in_fmt, out_fmt) == pytest.approx(expected)
    assert convert_box(convert_box(box, in_fmt, out_fmt), out_fmt, in_fmt) == pytest.approx(box)


def test_convert_hand_worked_and_unknown_format():
    assert convert_box((10, 20, 30, 40), "xywh", "xyxy") == (10.0, 20.0, 40.0, 60.0)
    assert convert_box((10, 20, 30, 40), "xyxy", "cxcywh") == (20.0, 30.0, 20.0, 20.0)
    with pytest.raises(ValueError, match="unknown box format"):
        convert_box((0, 0, 1, 1), "yxyx", "xyxy")


def test_order_clamp_area():
    assert order_corners((30, 40, 10, 20)) == (10.0, 20.0, 30.0, 40.0)
    assert clamp_box((-5, 10, 700, 500), (640, 480)) == (0.0, 10.0, 640.0, 480.0)
    assert box_area((0, 0, 4, 5)) == 20.0
    assert box_area((4, 5, 0, 0)) == 0.0  # swapped corners count as empty, never negative


def test_normalize_round_trip():
    assert normalize_box((64, 48, 320, 240), (640, 480)) == (0.1, 0.1, 0.5, 0.5)
    assert denormalize_box((0.1, 0.1, 0.5, 0.5), (640, 480)) == pytest.approx((64, 48, 320, 240))


def test_enclosing_box():
    assert enclosing_box([(10, 10, 20, 20), (5, 15, 12, 30)]) == (5.0, 10.0, 20.0, 30.0)
    with pytest.raises(ValueError):
        enclosing_box([])


def test_square_padding_as_expand2square():
    # LLaVA/Shikra paste (W, H) at ((S - W) // 2, (S - H) // 2) on an S = max(W, H) square
    assert square_pad_geometry((400, 200)) == (0, 100, 400)
    assert square_pad_geometry((201, 400)) == (99, 0, 400)
    assert square_pad_geometry((300, 300)) == (0, 0, 300)
    assert to_square_padded((40, 20, 200, 180), (400, 200)) == (0.1, 0.3, 0.5, 0.7)
    assert from_square_padded((0.1, 0.3, 0.5, 0.7), (400, 200)) == pytest.approx((40, 20, 200, 180))
    assert from_square_padded(to_square_padded((7, 9, 150, 333), (201, 400)), (201, 400)) == pytest.approx(
        (7, 9, 150, 333)
    )

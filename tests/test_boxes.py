"""Box spaces and overlap measures: hand-computed values and round trips."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visual_rft.tasks.boxes import (
    BoxSpace,
    area,
    from_space,
    giou,
    intersection_area,
    iou,
    is_finite_box,
    is_valid_box,
    space_limits,
    to_space,
    union_area,
)


def test_box_space_parse_accepts_values_and_members():
    assert BoxSpace.parse("qwen2vl") is BoxSpace.QWEN2VL
    assert BoxSpace.parse(" Pixels ") is BoxSpace.PIXELS
    assert BoxSpace.parse(BoxSpace.NORMALIZED) is BoxSpace.NORMALIZED
    assert BoxSpace.NORMALIZED == "normalized"  # a str enum: YAML strings compare equal


def test_box_space_parse_rejects_unknown_naming_valid():
    with pytest.raises(ValueError, match="qwen2vl.*pixels.*normalized"):
        BoxSpace.parse("xywh")


def test_space_limits():
    assert space_limits("qwen2vl") == (1000.0, 1000.0)
    assert space_limits(BoxSpace.NORMALIZED) == (1.0, 1.0)
    assert space_limits("pixels", 640, 480) == (640.0, 480.0)
    with pytest.raises(ValueError):
        space_limits("pixels")
    with pytest.raises(ValueError):
        space_limits("pixels", 0, 480)


def test_to_space_hand_values():
    box = (64.0, 48.0, 320.0, 240.0)
    assert to_space(box, 640, 480, "pixels") == box
    assert to_space(box, 640, 480, "normalized") == (0.1, 0.1, 0.5, 0.5)
    assert to_space(box, 640, 480, "qwen2vl") == (100, 100, 500, 500)
    # floored like the original data builder int(x / W * 1000), clamped to 0..1000
    assert to_space((0.9, 0, 641, 10), 640, 480, "qwen2vl") == (1, 0, 1000, 20)
    # 3/10 of 1000 is exactly 300, not 299 through float error
    assert to_space((3, 3, 7, 7), 10, 10, "qwen2vl") == (300, 300, 700, 700)


def test_from_space_hand_values():
    assert from_space((100, 100, 500, 500), 640, 480, "qwen2vl") == (64.0, 48.0, 320.0, 240.0)
    assert from_space((0.1, 0.1, 0.5, 0.5), 640, 480, "normalized") == pytest.approx((64, 48, 320, 240))
    assert from_space((1, 2, 3, 4), 640, 480, BoxSpace.PIXELS) == (1.0, 2.0, 3.0, 4.0)


coord = st.floats(0, 1, allow_nan=False)
size = st.integers(1, 4000)


@settings(max_examples=150, deadline=None)
@given(coord, coord, coord, coord, size, size)
def test_round_trips(a, b, c, d, w, h):
    box = (min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h)
    for space in ("pixels", "normalized"):
        back = from_space(to_space(box, w, h, space), w, h, space)
        assert back == pytest.approx(box, abs=1e-6 * max(w, h))
    back = from_space(to_space(box, w, h, "qwen2vl"), w, h, "qwen2vl")
    # flooring to 1/1000 of the image loses at most one step, always downwards
    for orig, got, extent in zip(box, back, (w, h, w, h)):
        assert orig - extent / 1000 - 1e-6 <= got <= orig + 1e-6


def test_iou_hand_values():
    a, b = (0, 0, 10, 10), (5, 0, 15, 10)
    assert intersection_area(a, b) == 50
    assert union_area(a, b) == 150
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(a, a) == 1.0
    assert iou(a, (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    # degenerate and inverted boxes have zero area, never NaN
    assert iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0
    assert area((10, 10, 0, 0)) == 0.0


def test_giou_hand_values():
    a = (0, 0, 10, 10)
    assert giou(a, a) == 1.0
    # disjoint: iou 0, enclosing 20x10=200, union 200 -> 0
    assert giou(a, (10, 0, 20, 10)) == 0.0
    # far apart: enclosing 30x30=900, union 200 -> -(700/900)
    assert giou(a, (20, 20, 30, 30)) == pytest.approx(-700 / 900)
    # half overlap: iou 1/3, enclosing 150 = union -> 1/3
    assert giou(a, (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert giou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=8, max_size=8))
def test_iou_giou_ranges_are_bounded(v):
    a, b = tuple(v[:4]), tuple(v[4:])
    assert 0.0 <= iou(a, b) <= 1.0 + 1e-12
    g = giou(a, b)
    assert math.isfinite(g) and -1.0 - 1e-12 <= g <= 1.0 + 1e-12


def test_box_validity():
    assert is_finite_box([1, 2, 3, 4]) and is_finite_box((1.5, 2, 3, 4))
    assert not is_finite_box([1, 2, 3])
    assert not is_finite_box([True, 2, 3, 4])
    assert not is_finite_box([float("nan"), 2, 3, 4])
    assert not is_finite_box([10**400, 2, 3, 4])
    assert not is_finite_box("1234")
    assert is_valid_box([0, 0, 1000, 1000], 1000, 1000)
    assert not is_valid_box([0, 0, 1001, 10], 1000, 1000)
    assert not is_valid_box([5, 0, 5, 10], 1000, 1000)
    assert not is_valid_box([-1, 0, 5, 10], 1000, 1000)

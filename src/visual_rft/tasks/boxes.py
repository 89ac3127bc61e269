"""Box coordinate spaces and the overlap measures every box task shares.

A box is `(x1, y1, x2, y2)` (top-left, bottom-right). Which numbers a model writes for a box
depends on the model family, and a silent mismatch is what kept the anchors' IoU reward near zero,
so the space is an explicit, typed setting:

- `BoxSpace.QWEN2VL` ("qwen2vl"): integers 0..1000 relative to the image (Qwen2-VL, and the
  original Visual-RFT data, built as `int(coord / W * 1000)`).
- `BoxSpace.PIXELS` ("pixels"): absolute pixels of the image the model saw (Qwen2.5-VL).
- `BoxSpace.NORMALIZED` ("normalized"): floats 0..1 relative to the image.

`iou`/`giou` treat an inverted extent (x2 < x1) as zero width; they never return NaN for finite
input. Callers that must reject inverted or non-finite boxes (the strict rewards) check first.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

Box = tuple[float, float, float, float]

QWEN2VL_SCALE = 1000


class BoxSpace(str, Enum):
    """The coordinate space a model writes boxes in."""

    QWEN2VL = "qwen2vl"
    PIXELS = "pixels"
    NORMALIZED = "normalized"

    @classmethod
    def parse(cls, value: "BoxSpace | str") -> "BoxSpace":
        """Accept an enum member or its string value; anything else is a ValueError naming the options."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(repr(s.value) for s in cls)
            raise ValueError(f"unknown box space {value!r}; valid: {valid}") from None


def _check_size(width: float | None, height: float | None) -> tuple[float, float]:
    if width is None or height is None or not (width > 0 and height > 0):
        raise ValueError(f"image width and height must be positive numbers, got {width!r} x {height!r}")
    return float(width), float(height)


def space_limits(
    space: BoxSpace | str, width: float | None = None, height: float | None = None
) -> tuple[float, float]:
    """The largest x and y a box may reach in `space` (the smallest is always 0).

    The pixel space needs the image size; the two relative spaces do not.
    """
    space = BoxSpace.parse(space)
    if space is BoxSpace.QWEN2VL:
        return float(QWEN2VL_SCALE), float(QWEN2VL_SCALE)
    if space is BoxSpace.NORMALIZED:
        return 1.0, 1.0
    return _check_size(width, height)


def to_space(box_xyxy_pixels: Sequence[float], width: float, height: float, space: BoxSpace | str) -> Box:
    """Convert a pixel box to `space`.

    qwen2vl coordinates are floored to integers and clamped to 0..1000, the way the original data
    was built (`int(coord / W * 1000)`), so converting the training data here reproduces it. The
    product is formed before the division so exact fractions (3/10 of 1000) do not floor to 299.
    """
    space = BoxSpace.parse(space)
    w, h = _check_size(width, height)
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_pixels)
    if space is BoxSpace.PIXELS:
        return (x1, y1, x2, y2)
    if space is BoxSpace.NORMALIZED:
        return (x1 / w, y1 / h, x2 / w, y2 / h)

    def q(v: float, size: float) -> int:
        return min(QWEN2VL_SCALE, max(0, math.floor(v * QWEN2VL_SCALE / size + 1e-9)))

    return (q(x1, w), q(y1, h), q(x2, w), q(y2, h))


def from_space(box: Sequence[float], width: float, height: float, space: BoxSpace | str) -> Box:
    """Convert a box written in `space` to absolute pixels of a `width` x `height` image."""
    space = BoxSpace.parse(space)
    w, h = _check_size(width, height)
    x1, y1, x2, y2 = (float(v) for v in box)
    if space is BoxSpace.PIXELS:
        return (x1, y1, x2, y2)
    scale = QWEN2VL_SCALE if space is BoxSpace.QWEN2VL else 1.0
    return (x1 / scale * w, y1 / scale * h, x2 / scale * w, y2 / scale * h)


def area(box: Sequence[float]) -> float:
    """Area with inverted extents counted as zero."""
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def intersection_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the overlap of two boxes (0 when they do not overlap)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def union_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Area covered by either box."""
    return area(a) + area(b) - intersection_area(a, b)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union in [0, 1]; 0 when the union is empty (two degenerate boxes)."""
    union = union_area(a, b)
    return intersection_area(a, b) / union if union > 0 else 0.0


def giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU in [-1, 1]: IoU minus the share of the enclosing box covered by neither box.

    When even the enclosing box is empty (both boxes are the same degenerate point or line) there is
    nothing to penalise and the plain IoU (0) is returned.
    """
    union = union_area(a, b)
    enclosing = area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    value = intersection_area(a, b) / union if union > 0 else 0.0
    if enclosing > 0:
        value -= (enclosing - union) / enclosing
    return value


def is_finite_box(values: object) -> bool:
    """True for a sequence of exactly 4 finite real numbers (bools excluded: `true` is not a coordinate)."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return False
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in values
    )


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float is not a usable coordinate
        return False


def is_valid_box(box: Sequence[float], xmax: float, ymax: float) -> bool:
    """A proper box: finite, x1 < x2, y1 < y2, and inside [0, xmax] x [0, ymax]."""
    if not is_finite_box(box):
        return False
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= xmax and 0 <= y1 < y2 <= ymax

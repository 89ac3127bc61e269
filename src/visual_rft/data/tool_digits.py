"""Embedded digit tasks that need the image tools (issue 29): real MNIST digits, made hard to read in
ways a tool call undoes. Deterministic from a seed; every record keeps what a per-call reward or an
analysis needs.

- `embedded:mnist_rotated[?seed=0&size=56&angles=90,180,270]`: each digit turned counter-clockwise
  by one of `angles` (seeded per digit). Fields: `label`, `rotation` (the angle applied) and `undo`
  (the `rotate` angle that sets it upright again: (360 - rotation) % 360). A 6 turned by 180 looks
  like a 9 (and back): those records have `ambiguous` true, for analyses to leave out. With 0 among
  `angles` (e.g. `angles=0,90,180,270`) some digits are upright: whether to call is a decision too.
- `embedded:mnist_small[?seed=0&canvas=448&digit=28&box_space=qwen2vl]`: each digit, resized to
  `digit` px, pasted at a seeded position on a black `canvas` x `canvas` image. Downscaled to the
  model's input (the tiny model sees 56 x 56, so 1/8 here) it is a blob that cannot be read until it
  is cropped or zoomed; a real model needs a small processor max_pixels for the same effect. Fields:
  `label`, `box` (the digit's ink, in `box_space`, rounded as detection targets are), `box_pixels`,
  `image_size`, `box_space` and `origin` ([x, y] of the pasted digit).

Each record's `tool_calls` is its expert trajectory (tools/trajectory.py, for SFT on tool use):
mnist_rotated `[{"name": "rotate", "arguments": {"angle": undo}}]` (none for an upright digit),
mnist_small a `zoom` on the digit's box with a margin of a quarter of `digit` px, in `box_space`.

Both take the digits of `mnist_records` (class-balanced under `limit`) in its order; the seed only
draws each digit's rotation or position, from the digit's own source name, so a record does not
change when `limit` does.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from visual_rft.data.embedded import mnist_records
from visual_rft.data.errors import DataError
from visual_rft.data.record import Record
from visual_rft.data.targets import to_target
from visual_rft.tasks.boxes import BoxSpace
from visual_rft.tools.images import ANGLES, rotate


def rotated_digit_records(*, limit: int | None = None, seed: int = 0, size: int = 56,
                          angles: Sequence[int] = ANGLES) -> list[Record]:
    """MNIST digits, each rotated counter-clockwise by a seeded choice of `angles` (0 = upright)."""
    bad = [a for a in angles if a not in (0, *ANGLES)]
    if bad or not angles:
        raise DataError(f"angles must be among 0, 90, 180, 270, got {list(angles)}")
    records = []
    for digit in mnist_records(limit=limit, size=size):
        angle = random.Random(f"{seed}:rotated:{digit.source}").choice(list(angles))
        image = digit.image if angle == 0 else rotate(digit.image, angle)
        label = digit.fields["label"]
        undo = (360 - angle) % 360
        fields = {"label": label, "rotation": angle, "undo": undo, "ambiguous": angle == 180 and label in ("6", "9"),
                  "tool_calls": [{"name": "rotate", "arguments": {"angle": undo}}] if angle else []}
        records.append(Record(image, "", digit.solution, fields, f"{digit.source}@rot{angle}"))
    return records


def small_digit_records(*, limit: int | None = None, seed: int = 0, canvas: int = 448, digit: int = 28,
                        box_space: BoxSpace | str = BoxSpace.QWEN2VL) -> list[Record]:
    """MNIST digits resized to `digit` px, each pasted at a seeded position on a black canvas."""
    if not 8 <= digit <= canvas:
        raise DataError(f"digit must be between 8 px and the canvas ({canvas} px), got {digit}")
    space = BoxSpace.parse(box_space)
    records = []
    for item in mnist_records(limit=limit, size=digit):
        rng = random.Random(f"{seed}:small:{item.source}")
        x, y = rng.randrange(canvas - digit + 1), rng.randrange(canvas - digit + 1)
        image = Image.new("RGB", (canvas, canvas))
        image.paste(item.image, (x, y))
        box = _ink_box(item.image, x, y)
        size = (canvas, canvas)
        view = _with_margin(box, digit / 4, canvas)
        fields = {"label": item.fields["label"], "box": to_target(box, size, size, space),
                  "box_pixels": box, "image_size": [canvas, canvas], "box_space": space.value, "origin": [x, y],
                  "tool_calls": [{"name": "zoom", "arguments": {"box": to_target(view, size, size, space)}}]}
        records.append(Record(image, "", item.solution, fields, f"{item.source}@{x},{y}"))
    return records


def _ink_box(image: Image.Image, x: int, y: int) -> list[float]:
    """The tight box (canvas pixels, right/bottom exclusive) of a pasted digit's non-black pixels."""
    ink = np.asarray(image.convert("L")) > 0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return [float(x + cols[0]), float(y + rows[0]), float(x + cols[-1] + 1), float(y + rows[-1] + 1)]


def _with_margin(box: list[float], margin: float, canvas: int) -> list[float]:
    """`box` grown by `margin` px on every side, clamped to the canvas (whole pixels)."""
    x1, y1, x2, y2 = box
    return [float(max(0, int(x1 - margin))), float(max(0, int(y1 - margin))),
            float(min(canvas, -int(-(x2 + margin)))), float(min(canvas, -int(-(y2 + margin))))]


def _angles(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


_SOURCES: dict[str, tuple[Callable[..., list[Record]], dict[str, Callable[[str], Any]]]] = {
    "mnist_rotated": (rotated_digit_records, {"seed": int, "size": int, "angles": _angles}),
    "mnist_small": (small_digit_records, {"seed": int, "canvas": int, "digit": int, "box_space": str}),
}
NAMES = tuple(_SOURCES)


def tool_digits_from_spec(name: str, *, limit: int | None = None, box_space: str | None = None) -> list[Record]:
    """Records for `embedded:mnist_rotated?...` / `embedded:mnist_small?...` (`name` is the part after
    `embedded:`); `box_space` (task.box_space resolved) is mnist_small's default, its own option wins."""
    base, _, query = name.partition("?")
    if base not in _SOURCES:
        raise DataError(f"embedded:{name}: unknown embedded dataset (available: {', '.join(NAMES)})")
    build, casts = _SOURCES[base]
    kwargs: dict[str, Any] = {"box_space": box_space} if box_space and "box_space" in casts else {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in casts:
            raise DataError(f"embedded:{name}: unknown option {key!r}; known: {sorted(casts)}")
        try:
            kwargs[key] = casts[key](value)
        except ValueError as exc:
            raise DataError(f"embedded:{name}: bad value for {key}: {value!r}") from exc
    return build(limit=limit, **kwargs)

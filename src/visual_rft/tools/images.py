"""The image tools themselves: pure functions from a PIL image (and checked arguments) to a new image.

Nothing here parses model output or knows about conversations; calls.py checks what the model wrote
and registry.py maps a call onto these functions. Every function returns a new RGB image and leaves
its input untouched.

Boxes come in the run's box space (tasks/boxes.py: qwen2vl 0..1000, normalized 0..1, or pixels) and
go to pixels through `boxes.from_space`, the converter detection and grounding use. In the pixel
space a box is written in pixels of the *frame* the model saw (Qwen2.5-VL: its resized input); the
frame is scaled onto the stored image exactly as det_eval scales a detection onto `orig_size`. The
pixel rectangle covers the box: its left/top edges are floored and its right/bottom edges ceiled.
"""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageOps

from visual_rft.tasks.boxes import BoxSpace, from_space, is_valid_box, space_limits

# Qwen2-VL's processor refuses images whose sides differ by more than 200x (smart_resize); a tool must
# never hand it one, so thinner boxes are refused (with room to spare for the processor's rounding).
MAX_ASPECT_RATIO = 100
# Rounding slack: 300 / 1000 * 10 is 3.0000000000000004 in floats, which must not ceil to 4.
_EPS = 1e-6

PixelRect = tuple[int, int, int, int]


def box_in_space(box: Sequence[float], space: BoxSpace | str, frame: tuple[float, float]) -> bool:
    """A proper box (finite, x1 < x2, y1 < y2) inside the limits of `space` for a `frame` (w, h)."""
    return is_valid_box(box, *space_limits(space, *frame))


def box_to_pixels(box: Sequence[float], space: BoxSpace | str, size: tuple[int, int],
                  frame: tuple[float, float] | None = None) -> PixelRect:
    """The pixel rectangle (left, top, right, bottom) of the stored `size` image that covers `box`.

    `frame` is the (w, h) the box's pixel coordinates refer to (default: `size` itself); relative
    spaces do not depend on it. The result is clamped to the image and may be empty (right == left).
    """
    width, height = size
    fw, fh = frame if frame is not None else size
    x1, y1, x2, y2 = from_space(box, fw, fh, space)
    sx, sy = width / fw, height / fh

    def low(v: float, limit: int) -> int:
        return min(limit, max(0, math.floor(v + _EPS)))

    def high(v: float, limit: int) -> int:
        return min(limit, max(0, math.ceil(v - _EPS)))

    return low(x1 * sx, width), low(y1 * sy, height), high(x2 * sx, width), high(y2 * sy, height)


def rect_problem(rect: PixelRect) -> str | None:
    """Why a pixel rectangle cannot be a tool's output (empty, or thinner than MAX_ASPECT_RATIO), else None."""
    w, h = rect[2] - rect[0], rect[3] - rect[1]
    if w < 1 or h < 1:
        return f"the box covers {max(w, 0)}x{max(h, 0)} pixels, less than one pixel"
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return f"the box is {w}x{h} pixels, thinner than 1:{MAX_ASPECT_RATIO}"
    return None


def crop(image: Image.Image, rect: PixelRect) -> Image.Image:
    """The pixels inside `rect` (from box_to_pixels), at their own resolution."""
    return image.convert("RGB").crop(rect)


def zoom_size(width: int, height: int, target_pixels: int, multiple: int) -> tuple[int, int]:
    """The (w, h) a zoom resizes a `width` x `height` crop to: about `target_pixels` in area, the crop's
    aspect ratio, each side a multiple of `multiple` (at least one multiple).

    With `multiple` = the processor's patch x merge size (28 for Qwen-VL) and `target_pixels` within
    its min/max pixels, the processor takes the zoomed image as it is, without resizing it again.
    """
    if target_pixels < 1 or multiple < 1:
        raise ValueError(f"target_pixels and multiple must be positive, got {target_pixels} and {multiple}")
    scale = math.sqrt(target_pixels / (width * height))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def zoom(image: Image.Image, rect: PixelRect, target_pixels: int, multiple: int) -> Image.Image:
    """The crop of `rect` resized (bicubic) to zoom_size: the region seen with the whole image's token budget."""
    region = crop(image, rect)
    return region.resize(zoom_size(*region.size, target_pixels, multiple), Image.Resampling.BICUBIC)


_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
_FLIPS = {"horizontal": Image.Transpose.FLIP_LEFT_RIGHT, "vertical": Image.Transpose.FLIP_TOP_BOTTOM}
ANGLES = tuple(_ROTATIONS)
DIRECTIONS = tuple(_FLIPS)


def rotate(image: Image.Image, angle: int) -> Image.Image:
    """The image turned `angle` degrees counter-clockwise (90, 180 or 270), exactly (no resampling)."""
    return image.convert("RGB").transpose(_ROTATIONS[angle])


def flip(image: Image.Image, direction: str) -> Image.Image:
    """The mirror image: `horizontal` swaps left and right, `vertical` swaps top and bottom."""
    return image.convert("RGB").transpose(_FLIPS[direction])


def contrast(image: Image.Image) -> Image.Image:
    """Auto-contrast: each channel's darkest value becomes 0 and its brightest 255, linearly between."""
    return ImageOps.autocontrast(image.convert("RGB"))

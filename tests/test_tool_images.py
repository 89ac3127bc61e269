"""The image tools against hand-computed pixels: crop boxes in every box space, zoom sizes, rotate /
flip on a tiny asymmetric image, auto-contrast on known values (issue 29)."""

import numpy as np
import pytest
from PIL import Image

from visual_rft.tasks.boxes import BoxSpace
from visual_rft.tools import images as ops


def _ramp(width, height):
    """An RGB image whose pixel (x, y) is (x, y, 10 * x + y): every pixel tells where it came from."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            pixels[y, x] = (x, y, 10 * x + y)
    return Image.fromarray(pixels)


def _xy(image):
    """The (x, y) origin of every pixel of a crop of _ramp, as [[(x, y), ...], ...] rows."""
    a = np.asarray(image)
    return [[(int(p[0]), int(p[1])) for p in row] for row in a]


# (space, box, frame, expected pixel rect on a 20 x 10 image)
CROPS = [
    (BoxSpace.QWEN2VL, (100, 200, 400, 700), None, (2, 2, 8, 7)),
    (BoxSpace.QWEN2VL, (0, 0, 1000, 1000), None, (0, 0, 20, 10)),
    # 150 / 1000 * 20 = 3.0000000000000004 in floats: it must not ceil to 4
    (BoxSpace.QWEN2VL, (50, 0, 150, 300), None, (1, 0, 3, 3)),
    # 0.33 * 20 = 6.6 -> floor 6; 0.51 * 10 = 5.1 -> ceil 6 (the rectangle covers the box)
    (BoxSpace.NORMALIZED, (0.33, 0.1, 0.5, 0.51), None, (6, 1, 10, 6)),
    (BoxSpace.PIXELS, (3, 2, 9, 5), None, (3, 2, 9, 5)),
    (BoxSpace.PIXELS, (3.5, 2.2, 9.1, 5.9), None, (3, 2, 10, 6)),
    # pixel boxes written in a 40 x 20 frame (the model's resized input) land on the stored 20 x 10 image
    (BoxSpace.PIXELS, (6, 4, 18, 10), (40, 20), (3, 2, 9, 5)),
]


@pytest.mark.parametrize("space, box, frame, rect", CROPS)
def test_box_to_pixels_and_crop_by_hand(space, box, frame, rect):
    image = _ramp(20, 10)
    assert ops.box_to_pixels(box, space, image.size, frame) == rect
    out = ops.crop(image, rect)
    x1, y1, x2, y2 = rect
    assert out.size == (x2 - x1, y2 - y1)
    assert _xy(out) == [[(x, y) for x in range(x1, x2)] for y in range(y1, y2)]


def test_box_in_space_uses_each_space_limits():
    assert ops.box_in_space((0, 0, 1000, 1000), "qwen2vl", (20, 10))
    assert not ops.box_in_space((0, 0, 1001, 1000), "qwen2vl", (20, 10))
    assert ops.box_in_space((0, 0, 20, 10), "pixels", (20, 10))
    assert not ops.box_in_space((0, 0, 21, 10), "pixels", (20, 10))
    assert not ops.box_in_space((0.5, 0, 0.5, 1), "normalized", (20, 10))  # zero width
    assert not ops.box_in_space((5, 5, 2, 8), "pixels", (20, 10))  # inverted


def test_rect_problems():
    assert ops.rect_problem((3, 3, 3, 9)) is not None  # empty
    assert ops.rect_problem((0, 0, 101, 1)) is not None  # 101:1, past the processor-safe ratio
    assert ops.rect_problem((0, 0, 100, 1)) is None
    assert ops.rect_problem((2, 2, 3, 3)) is None


def test_zoom_size_rule_by_hand():
    # 10 x 20 crop, 800 px target: scale sqrt(800 / 200) = 2 -> 20 x 40, already multiples of 4
    assert ops.zoom_size(10, 20, 800, 4) == (20, 40)
    # 28 x 28 crop of a 448 x 448 image, same budget: x16 -> 448 x 448
    assert ops.zoom_size(28, 28, 448 * 448, 28) == (448, 448)
    # 30 x 10, 56 * 56 target, multiple 28: scale sqrt(3136 / 300) = 3.23 -> 97.0 x 32.3 -> 84 x 28
    assert ops.zoom_size(30, 10, 56 * 56, 28) == (84, 28)
    assert ops.zoom_size(1, 1, 4, 28) == (28, 28)  # never below one multiple


def test_zoom_enlarges_the_region_only():
    image = Image.new("RGB", (40, 40), (0, 0, 0))
    image.paste((250, 10, 10), (20, 0, 40, 20))  # top-right quadrant red
    out = ops.zoom(image, (20, 0, 40, 20), 56 * 56, 28)
    assert out.size == (56, 56)
    assert np.array_equal(np.unique(np.asarray(out).reshape(-1, 3), axis=0), [[250, 10, 10]])


# a 3 x 2 image: rows "a b c" / "d e f" (pixel value = letter index)
def _letters():
    return Image.fromarray(np.array([[[1] * 3, [2] * 3, [3] * 3], [[4] * 3, [5] * 3, [6] * 3]], dtype=np.uint8))


def _grid(image):
    return np.asarray(image)[:, :, 0].tolist()


def test_rotate_counter_clockwise_by_hand():
    assert _grid(ops.rotate(_letters(), 90)) == [[3, 6], [2, 5], [1, 4]]
    assert _grid(ops.rotate(_letters(), 180)) == [[6, 5, 4], [3, 2, 1]]
    assert _grid(ops.rotate(_letters(), 270)) == [[4, 1], [5, 2], [6, 3]]
    assert _grid(ops.rotate(ops.rotate(_letters(), 90), 270)) == _grid(_letters())


def test_flip_by_hand():
    assert _grid(ops.flip(_letters(), "horizontal")) == [[3, 2, 1], [6, 5, 4]]
    assert _grid(ops.flip(_letters(), "vertical")) == [[4, 5, 6], [1, 2, 3]]


def test_contrast_stretches_each_channel_by_hand():
    pixels = np.array([[[100, 0, 7], [125, 0, 7], [150, 255, 7]]], dtype=np.uint8)
    out = np.asarray(ops.contrast(Image.fromarray(pixels)))
    # red 100..150 -> 0..255 (125 -> int(125 * 5.1 - 510) = 127); green already full; blue flat: unchanged
    assert out[0, :, 0].tolist() == [0, 127, 255]
    assert out[0, :, 1].tolist() == [0, 0, 255]
    assert out[0, :, 2].tolist() == [7, 7, 7]


def test_tools_leave_their_input_untouched():
    image = _letters()
    before = np.asarray(image).copy()
    for out in (ops.rotate(image, 90), ops.flip(image, "vertical"), ops.crop(image, (0, 0, 2, 1)),
                ops.contrast(image), ops.zoom(image, (0, 0, 2, 2), 64, 4)):
        assert out is not image and out.mode == "RGB"
    assert np.array_equal(np.asarray(image), before)

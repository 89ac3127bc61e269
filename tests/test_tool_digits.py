"""The embedded tool tasks (data/tool_digits.py): determinism, labels, and boxes a tool call can use."""

import numpy as np
from PIL import Image
import pytest

from visual_rft.data.embedded import mnist_records
from visual_rft.data.errors import DataError
from visual_rft.data.sources import load_records
from visual_rft.data.tool_digits import rotated_digit_records, small_digit_records
from visual_rft.tools.calls import ToolCall
from visual_rft.tools.images import rotate
from visual_rft.tools.registry import ToolSettings, execute


def _same(a, b):
    assert [r.source for r in a] == [r.source for r in b] and [r.fields for r in a] == [r.fields for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


def test_rotated_digits_undo_to_the_original():
    records = rotated_digit_records(limit=60, seed=0)
    originals = mnist_records(limit=60, size=56)
    assert [r.fields["label"] for r in records] == [o.fields["label"] for o in originals]
    assert [r.solution for r in records] == [o.solution for o in originals]
    for record, original in zip(records, originals):
        f = record.fields
        assert f["rotation"] in (90, 180, 270) and f["undo"] == 360 - f["rotation"]
        upright = rotate(record.image, f["undo"])
        assert np.array_equal(np.asarray(upright), np.asarray(original.image))
        assert f["ambiguous"] == (f["rotation"] == 180 and f["label"] in ("6", "9"))
    assert {r.fields["rotation"] for r in records} == {90, 180, 270}


def test_rotated_digits_are_seeded_per_digit():
    _same(rotated_digit_records(limit=30, seed=4), rotated_digit_records(limit=30, seed=4))
    other = rotated_digit_records(limit=30, seed=5)
    assert [r.fields["rotation"] for r in other] != [r.fields["rotation"] for r in rotated_digit_records(limit=30, seed=4)]
    # a digit keeps its rotation when the limit changes (2 vs 3 per class: the first 2 are the same digits)
    small = {r.source: r.fields["rotation"] for r in rotated_digit_records(limit=20, seed=4)}
    large = {r.source: r.fields["rotation"] for r in rotated_digit_records(limit=30, seed=4)}
    assert small.items() <= large.items()
    assert {r.fields["rotation"] for r in rotated_digit_records(limit=30, angles=(0, 180))} == {0, 180}
    with pytest.raises(DataError, match="angles"):
        rotated_digit_records(limit=3, angles=(45,))


def test_small_digits_sit_at_their_box():
    records = small_digit_records(limit=20, seed=1, canvas=224, digit=28)
    digits = mnist_records(limit=20, size=28)
    for record, digit in zip(records, digits):
        f = record.fields
        canvas = np.asarray(record.image)
        x, y = f["origin"]
        assert record.image.size == (224, 224) and f["image_size"] == [224, 224] and f["box_space"] == "qwen2vl"
        assert np.array_equal(canvas[y:y + 28, x:x + 28], np.asarray(digit.image))  # the digit, unchanged
        outside = canvas.copy()
        outside[y:y + 28, x:x + 28] = 0
        assert not outside.any()  # black everywhere else
        x1, y1, x2, y2 = (int(v) for v in f["box_pixels"])
        ink = canvas.any(axis=2)
        assert ink[y1:y2, x1:x2].sum() == ink.sum()  # the box holds all the ink ...
        assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any() and ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()
        # ... and a crop of the record's box (in its box space) through the tool holds it too
        crop = execute(ToolCall("crop", {"box": f["box"]}), [record.image], ToolSettings()).image
        assert np.asarray(crop).any(axis=2).sum() == ink.sum()
    assert [r.fields["label"] for r in records] == [d.fields["label"] for d in digits]


def test_small_digits_boxes_in_pixels_and_determinism():
    pixels = small_digit_records(limit=10, seed=2, box_space="pixels")
    assert all(r.fields["box"] == r.fields["box_pixels"] for r in pixels)
    qwen = small_digit_records(limit=10, seed=2)
    # 0..1000 relative, floored as the detection targets are: int(coord * 1000 / 448)
    assert [r.fields["box"] for r in qwen] == [[int(v * 1000 / 448) for v in r.fields["box_pixels"]] for r in qwen]
    _same(qwen, small_digit_records(limit=10, seed=2))
    assert [r.fields["origin"] for r in small_digit_records(limit=10, seed=3)] != [r.fields["origin"] for r in qwen]
    with pytest.raises(DataError, match="digit must be"):
        small_digit_records(limit=2, canvas=20, digit=28)


def test_specs_load_through_load_records():
    records = load_records("embedded:mnist_small?canvas=224&digit=28&seed=3", limit=10, box_space="pixels")
    assert len(records) == 10 and records[0].image.size == (224, 224) and records[0].fields["box_space"] == "pixels"
    _same(records, small_digit_records(limit=10, seed=3, canvas=224, box_space="pixels"))
    own = load_records("embedded:mnist_small?box_space=normalized", limit=2, box_space="pixels")
    assert own[0].fields["box_space"] == "normalized"  # the spec's own option wins
    rotated = load_records("embedded:mnist_rotated?angles=90,270&size=28", limit=10)
    assert {r.fields["rotation"] for r in rotated} <= {90, 270} and rotated[0].image.size == (28, 28)
    with pytest.raises(DataError, match="unknown option 'tile'"):
        load_records("embedded:mnist_rotated?tile=3", limit=2)
    with pytest.raises(DataError, match="bad value for canvas"):
        load_records("embedded:mnist_small?canvas=big", limit=2)


def test_small_digits_are_unreadable_at_the_tiny_input_until_zoomed():
    """A 1-NN reader (the other 4,800 MNIST digits) on 200 mnist_small records: the digit's cell of the
    canvas as the tiny model's processor sees it (448 -> 56 px, bicubic; the location given for free) is
    near chance; the zoom tool's output for a box around it reads as well as the original digit."""
    from sklearn.neighbors import KNeighborsClassifier

    def vector(image):
        return np.asarray(image.convert("L").resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32).ravel()

    records = small_digit_records(limit=200, seed=0)
    held_out = {r.source.split("@")[0] for r in records}
    train = [d for d in mnist_records() if d.source not in held_out]
    reader = KNeighborsClassifier(1).fit([vector(d.image) for d in train], [d.fields["label"] for d in train])
    labels = np.array([r.fields["label"] for r in records])
    seen, zoomed = [], []
    for record in records:
        x, y = record.fields["origin"]
        seen.append(vector(record.image.resize((56, 56), Image.Resampling.BICUBIC).crop(
            (x // 8, y // 8, x // 8 + 4, y // 8 + 4))))
        box = [v * 1000 / 448 for v in (x, y, x + 28, y + 28)]
        out = execute(ToolCall("zoom", {"box": box}), [record.image], ToolSettings(zoom_pixels=56 * 56))
        zoomed.append(vector(out.image))
    seen_accuracy = (reader.predict(seen) == labels).mean()
    zoomed_accuracy = (reader.predict(zoomed) == labels).mean()
    assert seen_accuracy < 0.3 and zoomed_accuracy > 0.85, (seen_accuracy, zoomed_accuracy)

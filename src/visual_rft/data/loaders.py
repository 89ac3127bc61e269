"""Turn a dataset on disk into `Record`s: JSON/JSONL, HF `save_to_disk`, parquet, ImageFolder.

Every format ends in the same row handler (`_row_to_record`), so the column rules are identical
everywhere: `image`, `problem`, `solution` (or `label`), everything else goes to `Record.fields`.
Bad input fails here, naming the file and row, rather than deep inside a training step.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from visual_rft.data.record import Record

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CORE = ("image", "images", "problem", "solution")


class DataError(ValueError):
    """A dataset that cannot be used, with the file and row that are wrong."""


def load_records(
    path: str | Path,
    *,
    task: str = "classification",
    image_root: str | Path | None = None,
    limit: int | None = None,
    box_space: str | None = None,
) -> list[Record]:
    """Load records from `path`, choosing the reader by what `path` is.

    `path` may be a `.json` list or `.jsonl` file, a `save_to_disk` directory (Dataset or
    DatasetDict), a `.parquet` file or a directory of them, an ImageFolder directory,
    `embedded:mnist` / `embedded:sklearn_digits` / `embedded:trees`, or a detection source `coco:PATH?...`, `lvis:PATH?...`,
    `lisa:PATH?...` (see data/coco.py for the options). Append `::split` to pick a split of a directory (default "train").
    Relative image paths resolve against `image_root`, else the data file's folder.
    `limit` keeps the first `limit` rows (in file order). `box_space` (task.box_space resolved) is the
    default for sources that convert boxes themselves and for records without a box_space field; a
    source's own `?box_space=` and a record's field win.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    text = str(path)
    if text.startswith("embedded:"):
        return _load_embedded(text, limit, box_space)
    if text.startswith(("coco:", "lvis:", "lisa:")):
        from visual_rft.data.coco import load_detection_source

        records = load_detection_source(text, image_root=image_root, limit=limit, box_space=box_space)
        if not records:
            raise DataError(f"no records in {path}")
        return records
    split = None
    if "::" in text:
        text, split = text.rsplit("::", 1)
    target = Path(text)
    root = Path(image_root) if image_root is not None else None
    if not target.exists():
        raise DataError(f"{target}: no such file or directory")
    records = _dispatch(target, split, root, task, limit)
    if not records:
        raise DataError(f"no records in {path}")
    if box_space and task != "classification":
        for record in records:
            record.fields.setdefault("box_space", box_space)
    return records


def _dispatch(
    target: Path, split: str | None, root: Path | None, task: str, limit: int | None
) -> list[Record]:
    if target.is_file():
        if split is not None:
            raise DataError(f"{target}: '::{split}' selects a split of a directory, not of a file")
        suffix = target.suffix.lower()
        if suffix == ".jsonl":
            return _rows_to_records(jsonl_rows(target), root or target.parent, task, limit)
        if suffix == ".json":
            return _rows_to_records(_json_rows(target), root or target.parent, task, limit)
        if suffix == ".parquet":
            return _load_parquet([target], root, task, limit)
        raise DataError(f"{target}: unknown data format (expected .json, .jsonl or .parquet)")
    if (target / "data.jsonl").is_file() and split is None:
        # A folder written by fewshot.write_split: its images/ sub-folder is not an ImageFolder class.
        return _dispatch(target / "data.jsonl", None, root, task, limit)
    if (target / "dataset_dict.json").exists() or (target / "state.json").exists():
        return _load_hf_disk(target, split, root, task, limit)
    parquet = sorted(target.rglob("*.parquet"))
    if parquet:
        return _load_parquet(_pick_parquet_split(target, parquet, split), root, task, limit)
    if split is not None:
        target = target / split
        if not target.is_dir():
            raise DataError(f"{target}: split '{split}' not found")
    return _load_image_folder(target, limit)


def _load_embedded(text: str, limit: int | None, box_space: str | None = None) -> list[Record]:
    name = text.split(":", 1)[1]
    if name.split("::")[0].split("?")[0] == "trees":
        from visual_rft.data.trees import trees_from_spec

        return trees_from_spec(name, limit=limit, box_space=box_space)
    if name == "sklearn_digits":
        from visual_rft.data.embedded import sklearn_digits_records

        return sklearn_digits_records(limit=limit)
    if name != "mnist":
        raise DataError(f"{text}: unknown embedded dataset (available: embedded:mnist, embedded:sklearn_digits, "
                        "embedded:trees)")
    from visual_rft.data.embedded import mnist_records

    return mnist_records(limit=limit)


# ---- rows -> records -------------------------------------------------------------------------


def _rows_to_records(
    rows: Iterable[tuple[str, Any]],
    base: Path,
    task: str,
    limit: int | None,
    class_names: dict[str, list[str]] | None = None,
) -> list[Record]:
    records = []
    for source, row in rows:
        if limit is not None and len(records) >= limit:
            break
        records.append(_row_to_record(row, source, base, task, class_names or {}))
    return records


def _row_to_record(row: Any, source: str, base: Path, task: str, class_names: dict[str, list[str]]) -> Record:
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise DataError(f"{source}: row is a {kind}, expected an object with image/problem/solution")
    fields = {k: v for k, v in row.items() if k not in _CORE}
    for key, names in class_names.items():
        # HF ClassLabel columns store an index; the verifier needs the class name.
        if isinstance(fields.get(key), int) and 0 <= fields[key] < len(names):
            fields[key] = names[fields[key]]
    solution = row.get("solution")
    if solution is None:
        if fields.get("label") is None:
            raise DataError(f"{source}: row has no 'solution' (and no 'label' to build one from)")
        solution = f"<answer>{fields['label']}</answer>"
    if not isinstance(solution, str):
        raise DataError(f"{source}: 'solution' must be a string, got {type(solution).__name__}")
    problem = row.get("problem") or ""
    if not isinstance(problem, str):
        raise DataError(f"{source}: 'problem' must be a string, got {type(problem).__name__}")
    if task == "classification":
        label = fields.get("label")
        fields["label"] = str(label).strip() if label is not None else answer_text(solution)
    image = _resolve_image(_image_value(row, source), source, base)
    return Record(image=image, problem=problem, solution=solution, fields=fields, source=source)


def answer_text(solution: str) -> str:
    """The text inside `<answer>…</answer>`, or the whole solution when it has no tags."""
    match = _ANSWER.search(solution)
    return (match.group(1) if match else solution).strip()


def _image_value(row: dict, source: str) -> Any:
    if row.get("image") is not None:
        return row["image"]
    images = row.get("images")
    # TRL-style datasets keep a list of images; Visual-RFT's tasks use exactly one per example.
    if isinstance(images, list) and len(images) == 1 and images[0] is not None:
        return images[0]
    if isinstance(images, list) and len(images) > 1:
        raise DataError(f"{source}: row has {len(images)} images; one image per record is supported")
    raise DataError(f"{source}: row has no 'image'")


def _resolve_image(value: Any, source: str, base: Path) -> Image.Image | Path | bytes:
    """A lazily decoded PIL image (only the header is read here), an image path, or the raw bytes of
    an image whose header does not decode. Files and bytes that are no image at all (zero bytes, a
    text file, garbage after a PNG signature) are kept as they are: the data check reports every
    one of them as a bad record, as it does a half-written PNG, so `on_bad_record=skip` can drop them
    and `data check` can list them all instead of stopping at the first."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # HF image feature: {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return _open_bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise DataError(f"{source}: image has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return _open_bytes(bytes(value))
    if not isinstance(value, (str, Path)):
        raise DataError(f"{source}: 'image' must be a path or image, got {type(value).__name__}")
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise DataError(f"{source}: image file not found: {path}")
    return path


def _open_bytes(data: bytes) -> Image.Image | bytes:
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        return bytes(data)  # not an image: the data check names it (see _resolve_image)


# ---- JSON / JSONL ------------------------------------------------------------------------------


def jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON line: {exc.msg}") from exc
            yield f"{path}:{number}", row


def _json_rows(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:{number}", row


# ---- HF save_to_disk and parquet --------------------------------------------------------------


def _load_hf_disk(
    target: Path, split: str | None, root: Path | None, task: str, limit: int | None
) -> list[Record]:
    import datasets

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
    # The arrow view keeps image features as raw {bytes, path}: no image is decoded here.
    rows = loaded.with_format("arrow")[:count].to_pylist()
    numbered = ((f"{source}:{i}", row) for i, row in enumerate(rows, start=1))
    return _rows_to_records(numbered, root or target, task, limit, names)


def _load_parquet(files: list[Path], root: Path | None, task: str, limit: int | None) -> list[Record]:
    import pyarrow.parquet as pq

    records: list[Record] = []
    for file in files:
        left = None if limit is None else limit - len(records)
        if left == 0:
            break
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{file}: not a readable parquet file: {exc}") from exc
        if left is not None:
            table = table.slice(0, left)
        numbered = ((f"{file}:{i}", row) for i, row in enumerate(table.to_pylist(), start=1))
        records += _rows_to_records(numbered, root or file.parent, task, left, _parquet_class_names(table))
    return records


def _parquet_class_names(table: Any) -> dict[str, list[str]]:
    """ClassLabel names that `datasets` stores in the parquet schema metadata, if any."""
    raw = (table.schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    features = json.loads(raw).get("info", {}).get("features", {})
    return {
        k: f["names"] for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
    }


def _split_of(file: Path, top: Path) -> set[str]:
    """Split names a parquet file belongs to: HF names files `train-00000-of-00001.parquet`."""
    return {file.stem.split("-")[0], *file.relative_to(top).parts[:-1]}


def _pick_parquet_split(top: Path, files: list[Path], split: str | None) -> list[Path]:
    wanted = split or "train"
    chosen = [f for f in files if wanted in _split_of(f, top)]
    if split is not None and not chosen:
        raise DataError(f"{top}: no parquet files for split '{split}'")
    # Without a split, a hub layout (train-*, test-*) loads only train; plain files load together.
    return chosen or files


# ---- ImageFolder -------------------------------------------------------------------------------


def _load_image_folder(top: Path, limit: int | None) -> list[Record]:
    classes = [d for d in sorted(top.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not any(_images_in(d) for d in classes) and (top / "train").is_dir():
        top = top / "train"  # a split-per-folder layout: train/<class>/..., test/<class>/...
        classes = [d for d in sorted(top.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not any(_images_in(d) for d in classes):
        raise DataError(
            f"{top}: unknown data format (no .json/.jsonl/.parquet, no save_to_disk files, "
            "no class sub-folders with images)"
        )
    records = []
    for folder in classes:
        label = folder.name.replace("_", " ")
        for image in _images_in(folder):
            if limit is not None and len(records) >= limit:
                return records
            fields = {"label": label}
            records.append(Record(image, "", f"<answer>{label}</answer>", fields, str(image)))
    return records


def _images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]

"""Record files on disk -> `Record`s: JSON / JSONL, HF `save_to_disk`, parquet, ImageFolder.

Every format ends in the same row handler (`_row_to_record`), so the column rules are identical
everywhere: `image`, `problem`, `solution` (or `label`), everything else goes to `Record.fields`.
Bad input fails here, naming the file and row, rather than deep inside a training step.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from visual_rft.data.errors import DataError
from visual_rft.data.record import Record, answer_text
from visual_rft.data.rows import hf_disk_rows, json_rows, jsonl_rows, parquet_rows, parquet_split_files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_CORE = ("image", "images", "problem", "solution")


def load_record_files(
    spec: str, *, task: str, image_root: str | Path | None, limit: int | None, box_space: str | None
) -> list[Record]:
    """Records of the file or folder `spec` (`PATH` or `FOLDER::split`), the reader chosen by what it is.

    Relative image paths resolve against `image_root`, else the data file's folder. `box_space` is
    set on records of box tasks that lack a `box_space` field.
    """
    text, split = spec, None
    if "::" in text:
        text, split = text.rsplit("::", 1)
    target = Path(text)
    root = Path(image_root) if image_root is not None else None
    if not target.exists():
        raise DataError(f"{target}: no such file or directory")
    records = _dispatch(target, split, root, task, limit)
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
            return _rows_to_records(json_rows(target), root or target.parent, task, limit)
        if suffix == ".parquet":
            return _load_parquet([target], root, task, limit)
        raise DataError(f"{target}: unknown data format (expected .json, .jsonl or .parquet)")
    if (target / "data.jsonl").is_file() and split is None:
        # A folder written by fewshot.write_split: its images/ sub-folder is not an ImageFolder class.
        return _dispatch(target / "data.jsonl", None, root, task, limit)
    if (target / "dataset_dict.json").exists() or (target / "state.json").exists():
        rows, class_names = hf_disk_rows(target, split, limit)
        return _rows_to_records(rows, root or target, task, limit, class_names)
    parquet = sorted(target.rglob("*.parquet"))
    if parquet:
        return _load_parquet(parquet_split_files(target, parquet, split), root, task, limit)
    if split is not None:
        target = target / split
        if not target.is_dir():
            raise DataError(f"{target}: split '{split}' not found")
    return _load_image_folder(target, limit)


def _load_parquet(files: list[Path], root: Path | None, task: str, limit: int | None) -> list[Record]:
    records: list[Record] = []
    for file in files:
        left = None if limit is None else limit - len(records)
        if left == 0:
            break
        rows, class_names = parquet_rows(file, left)
        records += _rows_to_records(rows, root or file.parent, task, left, class_names)
    return records


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
    value = _image_value(row, source, task)
    image = ([_resolve_image(v, f"{source} (image {i})", base) for i, v in enumerate(value, start=1)]
             if isinstance(value, list) else _resolve_image(value, source, base))
    return Record(image=image, problem=problem, solution=solution, fields=fields, source=source)


def _image_value(row: dict, source: str, task: str) -> Any:
    """The row's image, or its list of images (`images: [...]`, as TRL / EasyR1 / VLM-R1 lay them out)."""
    if row.get("image") is not None:
        if row.get("images"):
            raise DataError(f"{source}: row has both 'image' and 'images'; keep one")
        return row["image"]
    images = row.get("images")
    if images is None:
        raise DataError(f"{source}: row has no 'image' (or 'images' list)")
    if not isinstance(images, (list, tuple)) or not images:
        raise DataError(f"{source}: 'images' must be a non-empty list of images, got {_kind(images)}")
    if any(image is None for image in images):
        raise DataError(f"{source}: 'images' item {[i is None for i in images].index(True) + 1} is empty")
    if len(images) > 1 and task != "classification":
        # Boxes are in one image's frame (image_size, box_space): a second image has no frame of its own here.
        raise DataError(f"{source}: row has {len(images)} images; {task} records hold one image "
                        "(several images per record are supported for classification)")
    return images[0] if len(images) == 1 else list(images)


def _kind(value: Any) -> str:
    return "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__


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

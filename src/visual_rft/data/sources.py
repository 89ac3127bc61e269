"""The top of data/: a data spec (`data.train`, `data.eval`, `data fewshot`'s source) -> `Record`s.

`load_records` picks the loader by the spec's prefix from `_LOADERS`; a spec without a known
prefix is a path for record_files. Everything below this module knows one format each.
`fewshot_command` (`visual-rft data fewshot`) lives here because it loads through `load_records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from visual_rft.data.detection_source import load_detection_source
from visual_rft.data.embedded import mnist_records, sklearn_digits_records
from visual_rft.data.errors import DataError
from visual_rft.data.fewshot import group_by, sample_k_shot, write_split
from visual_rft.data.record import Record
from visual_rft.data.record_files import load_record_files
from visual_rft.data.tool_digits import NAMES as TOOL_DIGITS, tool_digits_from_spec
from visual_rft.data.trees import trees_from_spec

_DIGITS = {"mnist": mnist_records, "sklearn_digits": sklearn_digits_records}


def _load_embedded(spec: str, *, limit: int | None, box_space: str | None, **_: Any) -> list[Record]:
    """`embedded:mnist`, `embedded:sklearn_digits`, `embedded:trees[::split][?options]`, or the tool
    tasks `embedded:mnist_rotated[?options]` / `embedded:mnist_small[?options]` (data/tool_digits.py)."""
    name = spec.split(":", 1)[1]
    base = name.split("::")[0].split("?")[0]
    if base == "trees":
        return trees_from_spec(name, limit=limit, box_space=box_space)
    if base in TOOL_DIGITS:
        return tool_digits_from_spec(name, limit=limit, box_space=box_space)
    if name not in _DIGITS:
        raise DataError(f"{spec}: unknown embedded dataset (available: embedded:mnist, embedded:sklearn_digits, "
                        "embedded:trees, embedded:mnist_rotated, embedded:mnist_small)")
    return _DIGITS[name](limit=limit)


def _load_annotations(spec: str, *, image_root: str | Path | None, limit: int | None, box_space: str | None,
                      **_: Any) -> list[Record]:
    return load_detection_source(spec, image_root=image_root, limit=limit, box_space=box_space)


# spec prefix (the text before the first ':') -> its loader, called as
# loader(spec, task=..., image_root=..., limit=..., box_space=...)
_LOADERS: dict[str, Callable[..., list[Record]]] = {
    "embedded": _load_embedded,
    "coco": _load_annotations,
    "lvis": _load_annotations,
    "lisa": _load_annotations,
}


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
    `embedded:mnist` / `embedded:sklearn_digits` / `embedded:trees`, or a detection source
    `coco:PATH?...`, `lvis:PATH?...`, `lisa:PATH?...` (see data/detection_source.py for the options).
    Append `::split` to pick a split of a directory (default "train").
    Relative image paths resolve against `image_root`, else the data file's folder.
    `limit` keeps the first `limit` rows (in file order). `box_space` (task.box_space resolved) is the
    default for sources that convert boxes themselves and for records without a box_space field; a
    source's own `?box_space=` and a record's field win.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    text = str(path)
    prefix, sep, _ = text.partition(":")
    loader = (_LOADERS.get(prefix) if sep else None) or load_record_files
    records = loader(text, task=task, image_root=image_root, limit=limit, box_space=box_space)
    # Files and annotation specs are the user's: no records there is a mistake worth stopping on.
    # The embedded sets ship with their packages and are returned as they come, as they always were.
    if not records and loader is not _load_embedded:
        raise DataError(f"no records in {path}")
    return records


def fewshot_command(
    source: str | Path,
    out_dir: str | Path,
    k: int,
    seed: int,
    label_key: str = "label",
    *,
    image_root: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`visual-rft data fewshot`: sample k per class from `source` and write the split to `out_dir`."""
    records = load_records(source, image_root=image_root)
    chosen = sample_k_shot(records, k, seed=seed, label_key=label_key)
    meta = {"source": str(source), "k": k, "seed": seed, "label_key": label_key}
    data = write_split(chosen, out_dir, meta=meta, overwrite=overwrite)
    classes = len(group_by(chosen, label_key))
    return {"classes": classes, "per_class": k, "total": len(chosen), "out": str(data)}

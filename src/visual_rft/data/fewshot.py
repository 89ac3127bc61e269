"""Seeded few-shot sampling and splitting, and writing a split to disk so runs can share it.

Randomness comes only from `random.Random` seeded with strings like "0:garden phlox": string seeds
are hashed with SHA-512 by `random`, so results never depend on PYTHONHASHSEED, and a class's
sample does not change when other classes are added or removed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from visual_rft.data.errors import DataError
from visual_rft.data.record import Record

DATA_FILE = "data.jsonl"
_RESERVED = {"image", "images", "problem", "solution"}


def group_by(records: list[Record], key: str) -> dict[str, list[int]]:
    """Record indices per class value (as str), classes sorted by name; missing key -> DataError."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if key not in record.fields:
            raise DataError(f"{record.source or f'record {index}'}: has no field '{key}' to group classes by")
        groups[str(record.fields[key])].append(index)
    return dict(sorted(groups.items()))


def _shuffled(indices: list[int], seed: int, label: str) -> list[int]:
    order = list(indices)
    random.Random(f"{seed}:{label}").shuffle(order)
    return order


def sample_k_shot(records: list[Record], k: int, *, seed: int, label_key: str = "label") -> list[Record]:
    """Pick `k` records of every class, reproducibly for a given `seed`.

    Each class is shuffled by its own seed and its first `k` are taken, so for one seed the k=4
    set is contained in the k=8 set (as in the paper's 1/2/4/8/16-shot ladder). The result is
    ordered by class name, then by position in `records`; the trainer shuffles batches itself.
    """
    if k <= 0:
        raise DataError(f"k must be positive, got {k}")
    chosen: list[int] = []
    for label, indices in group_by(records, label_key).items():
        if len(indices) < k:
            raise DataError(f"class '{label}' has only {len(indices)} records, fewer than k={k}")
        chosen += sorted(_shuffled(indices, seed, label)[:k])
    return [records[i] for i in chosen]


def split_records(
    records: list[Record],
    sizes: Mapping[str, int | float],
    *,
    seed: int,
    stratify_key: str | None = "label",
) -> dict[str, list[Record]]:
    """Cut `records` into disjoint named splits, e.g. {"warmup": 3000, "pool": 1000, "test": 1000}.

    `sizes` are all counts or all fractions of len(records) (summing to at most 1); records beyond
    the total are left out. With `stratify_key`, every split keeps the class proportions of the
    whole (within one record per class); with None it is a plain seeded shuffle.
    """
    counts = _counts(sizes, len(records))
    order = _stratified_order(records, seed, stratify_key)
    splits, start = {}, 0
    for name, count in counts.items():
        splits[name] = [records[i] for i in order[start : start + count]]
        start += count
    return splits


def _counts(sizes: Mapping[str, int | float], total: int) -> dict[str, int]:
    if not sizes:
        raise DataError("split sizes are empty")
    values = list(sizes.values())
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise DataError(f"split sizes must be non-negative numbers, got {dict(sizes)}")
    if all(isinstance(v, int) for v in values):
        if sum(values) > total:
            total_asked = sum(values)
            raise DataError(
                f"split sizes {dict(sizes)} add up to {total_asked}, more than the {total} records"
            )
        return dict(sizes)  # type: ignore[arg-type]
    if any(isinstance(v, int) and v > 1 for v in values) or sum(values) > 1 + 1e-9:
        raise DataError(f"split sizes {dict(sizes)} mix counts and fractions or add up to more than 1")
    # Round cumulative boundaries so the counts add up exactly to round(sum * total).
    counts, done, cumulative = {}, 0, 0.0
    for name, fraction in sizes.items():
        cumulative += fraction
        end = min(total, round(cumulative * total))
        counts[name], done = end - done, end
    return counts


def _stratified_order(records: list[Record], seed: int, key: str | None) -> list[int]:
    """A seeded order of all indices in which every prefix has the classes' proportions.

    Item j of a class with n items is placed at position (j + u) / n on [0, 1]; merging all
    classes by that position (systematic sampling) makes any consecutive run stratified. The
    seeded offset u per class decides which classes get the odd extra record, instead of always
    the alphabetically first ones.
    """
    if key is None:
        return _shuffled(list(range(len(records))), seed, "")
    keyed = []
    for label, indices in group_by(records, key).items():
        shuffled = _shuffled(indices, seed, label)
        offset, n = random.Random(f"{seed}:{label}:offset").random(), len(shuffled)
        keyed += [((j + offset) / n, label, index) for j, index in enumerate(shuffled)]
    return [index for _, _, index in sorted(keyed)]


def write_split(
    records: list[Record], out_dir: str | Path, *, meta: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write records as `out_dir/data.jsonl` + PNGs in `out_dir/images/`; return the jsonl path.

    `sources.load_records(out_dir / "data.jsonl")` reads back the same problems, solutions, fields and
    pixels (PNG is lossless; images are stored as RGB). `manifest.json` records `meta` (seed, k,
    source, ...) and each row's original source, kept out of the rows so they read back unchanged.
    """
    out = Path(out_dir)
    data = out / DATA_FILE
    if data.exists() and not overwrite:
        raise DataError(f"{data} already exists; choose another output folder or pass overwrite=True")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for number, record in enumerate(records, start=1):
        clash = _RESERVED & set(record.fields)
        if clash:
            raise DataError(f"{record.source}: field(s) {sorted(clash)} clash with the row columns")
        images = record.load_images()
        names = [f"images/{number:06d}.png"] if len(images) == 1 else [
            f"images/{number:06d}_{i}.png" for i in range(1, len(images) + 1)]
        for image, relative in zip(images, names):
            image.save(out / relative, format="PNG")
        where = {"image": names[0]} if len(names) == 1 else {"images": names}
        row = {**where, "problem": record.problem, "solution": record.solution, **record.fields}
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except TypeError as exc:
            raise DataError(f"{record.source}: a field cannot be written as JSON: {exc}") from exc
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    manifest = {**(meta or {}), "total": len(records), "sources": [r.source for r in records]}
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    return data


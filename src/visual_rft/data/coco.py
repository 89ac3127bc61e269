"""COCO / LVIS instance files -> detection `Record`s (the `coco:` / `lvis:` spec: data/detection_source.py).

Detection: one record per (image, category present), as Visual-RFT builds its data, with an empty
`problem` (the config's `task.question` fills in `{category}`) and fields `category`,
`category_id`, `image_id`, `boxes` (training targets in the configured box space, converted once,
here), `boxes_pixels` (xyxy exactly as annotated, for evaluation), `areas` (the annotations'
`area`, which COCO's small/medium/large ranges use), `image_size` ([w, h] of the frame `boxes` live
in: the stored image, or the model input when `input_size` is given),
`box_space`, `orig_size` ([w, h] stored) and `crowd` ([x1, y1, x2, y2, area] ignore regions).
Every record of a file has the same keys: batch columns stay aligned.
LVIS records also carry `frequency` and the image's `neg_category_ids` /
`not_exhaustive_category_ids` for LVIS-style evaluation. `solution` is
`<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>` (ints in the qwen2vl
space, pixels rounded to 0.01, normalized to 1e-4), or `<answer>No Objects</answer>` for the
optional negative queries (categories verified absent: COCO is exhaustive, LVIS lists
`neg_category_ids`).

Bad input, decided per case (counts land in `LoadReport`):
- unreadable / malformed JSON, missing `images` / `annotations` / `categories`, duplicate ids, an
  annotation naming an unknown image or category, a bbox that is not 4 finite numbers, image
  sizes that are not positive, a box more than `outside_tolerance` px outside its image (wrong
  coordinates or sizes), an unknown requested category: DataError naming the file and entry.
- a box slightly outside the image (COCO has sub-pixel overshoots): the training target is
  clipped to the image (count `clipped_boxes`); `boxes_pixels` keeps the annotation, so metrics
  equal the official tools'.
- degenerate boxes (w <= 0 or h <= 0): skipped, counted (`degenerate_boxes`); a pair left with
  no usable box is dropped (`pairs_without_boxes`). Metrics then exclude these boxes: the count
  says by how many.
- crowd annotations (iscrowd=1): never a target; kept as `crowd` ignore regions so evaluation
  treats them as COCOeval does; a pair with only crowd boxes gives no query (`crowd_only_pairs`).
- requested categories with no images: DataError; with no request, listed in
  `report.empty_categories` (a k-shot sample or mean AP would silently lack them otherwise).
- images listed but missing on disk: DataError by default; `missing_images="skip"` drops their
  records and counts them (`missing_images`).
"""

from __future__ import annotations

import difflib
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visual_rft.data.errors import DataError
from visual_rft.data.ov_splits import (
    annotate_split,
    get_split,
    lvis_split,
    resolve_categories,
)
from visual_rft.data.record import Record
from visual_rft.data.rows import read_json
from visual_rft.data.targets import LoadReport, clip_box, detection_solution, resolve_image, to_target
from visual_rft.tasks.boxes import BoxSpace

SizeFn = Callable[[int, int], tuple[int, int]]


# ---- checking the json --------------------------------------------------------------------------


def _entries(data: Any, key: str, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: not a COCO-format file: needs a '{key}' list at the top level")
    for index, entry in enumerate(data[key]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataError(f"{path}: {key}[{index}] is not an object with an 'id'")
    return data[key]


def _unique(entries: list[dict], key: str, path: Path) -> dict[Any, dict]:
    index: dict[Any, dict] = {}
    for entry in entries:
        if entry["id"] in index:
            raise DataError(f"{path}: duplicate {key} id {entry['id']!r}")
        index[entry["id"]] = entry
    return index


def _image_size(entry: dict, path: Path) -> tuple[float, float]:
    w, h = entry.get("width"), entry.get("height")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise DataError(f"{path}: image id {entry['id']!r} has no positive width/height ({w!r} x {h!r})")
    return float(w), float(h)


def _file_name(entry: dict, path: Path) -> str:
    if entry.get("file_name"):
        return str(entry["file_name"])
    url = str(entry.get("coco_url") or "")
    if url:  # LVIS v1 names images only by their COCO url: .../val2017/000000397133.jpg
        return "/".join(url.rstrip("/").split("/")[-2:])
    raise DataError(f"{path}: image id {entry['id']!r} has neither 'file_name' nor 'coco_url'")


def _annotation_box(ann: dict, size: tuple[float, float], where: str, tolerance: float) -> list[float] | None:
    """xyxy pixels of a usable box; None for a degenerate one; DataError for a wrong one."""
    bbox = ann.get("bbox")
    ok = isinstance(bbox, list) and len(bbox) == 4
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    box = [x, y, x + w, y + h]
    if min(x, y) < -tolerance or box[2] > size[0] + tolerance or box[3] > size[1] + tolerance:
        raise DataError(
            f"{where}: bbox {bbox} lies outside the {size[0]:g}x{size[1]:g} image by more than "
            f"{tolerance:g} px (wrong coordinates or image size?)"
        )
    return box


# ---- COCO / LVIS ---------------------------------------------------------------------------------


@dataclass
class _Pair:
    boxes: list[list[float]] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    crowd: list[list[float]] = field(default_factory=list)


def _group_annotations(data: Any, path: Path, images: dict, cats: dict, report: LoadReport,
                       tolerance: float) -> dict[tuple[Any, Any], _Pair]:
    pairs: dict[tuple[Any, Any], _Pair] = defaultdict(_Pair)
    for index, ann in enumerate(_entries(data, "annotations", path)):
        where = f"{path}: annotations[{index}] (id {ann['id']!r})"
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cats:
            raise DataError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        report.annotations += 1
        box = _annotation_box(ann, _image_size(images[ann["image_id"]], path), where, tolerance)
        if box is None:
            report.skipped["degenerate_boxes"] += 1
            continue
        area = float(ann.get("area") or (box[2] - box[0]) * (box[3] - box[1]))
        pair = pairs[(ann["image_id"], ann["category_id"])]
        if ann.get("iscrowd"):
            pair.crowd.append(box + [area])
            report.skipped["crowd_annotations"] += 1
        else:
            pair.boxes.append(box)
            pair.areas.append(area)
    return pairs


def _select_categories(cats: dict, wanted: Any, path: Path) -> list[Any]:
    """Category ids to load, in file order; unknown names are a DataError with close matches."""
    if wanted is None:
        return list(cats)
    by_name = {str(c.get("name")): cid for cid, c in cats.items()}
    names = resolve_categories(wanted)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        hints = {n: difflib.get_close_matches(n, list(by_name), n=2) for n in unknown}
        raise DataError(f"{path}: unknown categories {unknown} (close matches: {hints})")
    keep = {by_name[n] for n in names}
    return [cid for cid in cats if cid in keep]


def load_coco(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    categories: str | Iterable[str] | None = None,
    box_space: BoxSpace | str = BoxSpace.QWEN2VL,
    negatives: bool | int = False,
    seed: int = 0,
    missing_images: str = "error",
    verify_images: bool = True,
    input_size: SizeFn | None = None,
    outside_tolerance: float = 2.0,
    ov_split: str | None = None,
    lvis: bool = False,
    limit: int | None = None,
) -> tuple[list[Record], LoadReport]:
    """Detection records from a COCO instances (or, with `lvis=True`, LVIS) json; see the module doc.

    `categories`: names / named sets (ov_splits.NAMED_CATEGORY_SETS) to keep, default all.
    `negatives`: False none, True every verified-absent category, n at most n per image (seeded).
    `input_size(w, h) -> (w', h')`: the model-input frame for the pixel space (targets.qwen_input_size).
    `ov_split`: 'coco65_15', 'coco48_17' or 'lvis' sets each record's `ov_split` field.
    """
    path = Path(path)
    space = BoxSpace.parse(box_space)
    if missing_images not in ("error", "skip"):
        raise DataError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
    data = read_json(path)
    images = _unique(_entries(data, "images", path), "image", path)
    cats = _unique(_entries(data, "categories", path), "category", path)
    report = LoadReport(str(path), images=len(images))
    pairs = _group_annotations(data, path, images, cats, report, outside_tolerance)
    selected = _select_categories(cats, categories, path)
    _check_empty(selected, cats, pairs, categories is not None, path, report)
    root = Path(image_root) if image_root is not None else path.parent
    build = _RecordBuilder(path, root, space, input_size, cats, lvis, report, missing_images, verify_images)
    records: list[Record] = []
    for image_id, entry in images.items():
        if limit is not None and len(records) >= limit:
            break
        queries = _queries(image_id, entry, selected, pairs, negatives, seed, lvis, report)
        records += build.image_records(entry, queries)
    records = records[:limit] if limit is not None else records
    if ov_split:
        annotate_split(records, lvis_split(cats.values(), str(path)) if ov_split == "lvis" else get_split(ov_split))
    return records, report


def _check_empty(selected: list, cats: dict, pairs: dict, explicit: bool, path: Path, report: LoadReport) -> None:
    present = {cid for (_, cid), pair in pairs.items() if pair.boxes}
    empty = [str(cats[cid].get("name")) for cid in selected if cid not in present]
    if empty and explicit:
        raise DataError(f"{path}: requested categories have no (non-crowd, non-degenerate) boxes: {empty}")
    report.empty_categories = empty


def _queries(image_id: Any, entry: dict, selected: list, pairs: dict, negatives: bool | int, seed: int,
             lvis: bool, report: LoadReport) -> list[tuple[Any, _Pair | None]]:
    """(category id, its boxes or None for a negative) for one image, categories in file order."""
    out: list[tuple[Any, _Pair | None]] = []
    absent = []
    verified_absent = set(entry.get("neg_category_ids") or []) if lvis else None
    for cid in selected:
        pair = pairs.get((image_id, cid))
        if pair is not None and pair.boxes:
            out.append((cid, pair))
        elif pair is not None:
            report.skipped["crowd_only_pairs" if pair.crowd else "pairs_without_boxes"] += 1
        elif verified_absent is None or cid in verified_absent:
            absent.append(cid)
    if negatives is True:
        out += [(cid, None) for cid in absent]
    elif negatives:
        chosen = random.Random(f"{seed}:{image_id}").sample(absent, min(int(negatives), len(absent)))
        out += [(cid, None) for cid in absent if cid in chosen]
    return out


class _RecordBuilder:
    """Turns one image's queries into records; holds what every record of a file shares."""

    def __init__(self, path: Path, root: Path, space: BoxSpace, input_size: SizeFn | None, cats: dict,
                 lvis: bool, report: LoadReport, missing: str, verify: bool) -> None:
        self.path, self.root, self.space, self.input_size = path, root, space, input_size
        self.cats, self.lvis, self.report, self.missing, self.verify = cats, lvis, report, missing, verify

    def image_records(self, entry: dict, queries: list[tuple[Any, _Pair | None]]) -> list[Record]:
        if not queries:
            return []
        size = _image_size(entry, self.path)
        image = resolve_image(self.root / _file_name(entry, self.path), size if self.verify else None,
                              f"{self.path}: image id {entry['id']!r}", self.missing)
        if image is None:
            self.report.skipped["missing_images"] += 1
            return []
        frame = self.input_size(int(size[0]), int(size[1])) if self.input_size else size
        return [self._record(entry, image, size, frame, cid, pair) for cid, pair in queries]

    def _record(self, entry: dict, image: Path, size: tuple, frame: tuple, cid: Any, pair: _Pair | None) -> Record:
        cat = self.cats[cid]
        targets = []
        for box in pair.boxes if pair else []:
            clipped = clip_box(box, size)
            self.report.clipped_boxes += clipped != box
            targets.append(to_target(clipped, size, frame, self.space))
            self.report.collapsed_boxes += targets[-1][0] >= targets[-1][2] or targets[-1][1] >= targets[-1][3]
        fields: dict[str, Any] = {
            "category": str(cat.get("name")), "category_id": cid, "image_id": entry["id"], "boxes": targets,
            "boxes_pixels": [list(b) for b in pair.boxes] if pair else [], "areas": list(pair.areas) if pair else [],
            "image_size": [frame[0], frame[1]], "orig_size": [size[0], size[1]], "box_space": self.space.value,
            "crowd": [list(c) for c in pair.crowd] if pair else [],
        }
        if self.lvis:
            fields["frequency"] = cat.get("frequency")
            fields["neg_category_ids"] = list(entry.get("neg_category_ids") or [])
            fields["not_exhaustive_category_ids"] = list(entry.get("not_exhaustive_category_ids") or [])
        self.report.positives += pair is not None
        self.report.negatives += pair is None
        source = f"{self.path}:image {entry['id']}:{fields['category']}"
        return Record(image, "", detection_solution(targets), fields, source)

"""COCO / LVIS instance files -> detection `Record`s (LISA-style grounding files: data/lisa.py).

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

import json
import math
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visual_rft.data.loaders import DataError, jsonl_rows
from visual_rft.data.ov_splits import (
    annotate_split,
    get_split,
    lvis_split,
    resolve_categories,
)
from visual_rft.data.record import Record
from visual_rft.tasks.boxes import BoxSpace, from_space, to_space

NO_OBJECTS = "<answer>No Objects</answer>"
_ROUNDING = {BoxSpace.PIXELS: 2, BoxSpace.NORMALIZED: 4}
SizeFn = Callable[[int, int], tuple[int, int]]


@dataclass
class LoadReport:
    """What a load kept and what it skipped, so no count hides behind a metric."""

    source: str
    images: int = 0
    annotations: int = 0
    positives: int = 0
    negatives: int = 0
    clipped_boxes: int = 0
    collapsed_boxes: int = 0  # targets that became zero-width/height in the box space (tiny objects)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    empty_categories: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.positives} positive + {self.negatives} negative queries from {self.images} images"]
        if self.clipped_boxes:
            parts.append(f"{self.clipped_boxes} boxes clipped to the image")
        if self.collapsed_boxes:
            parts.append(f"{self.collapsed_boxes} targets collapsed to zero width/height in the box space")
        parts += [f"skipped {n} {key.replace('_', ' ')}" for key, n in sorted(self.skipped.items()) if n]
        if self.empty_categories:
            parts.append(f"{len(self.empty_categories)} categories without images: {self.empty_categories[:10]}")
        return f"{self.source}: " + "; ".join(parts)


# ---- solutions and sizes ------------------------------------------------------------------------


def detection_solution(boxes: Iterable[Iterable[float]]) -> str:
    """Visual-RFT's detection answer for ground-truth `boxes` (already in the box space)."""
    items = [{"Position": list(box), "Confidence": 1} for box in boxes]
    return f"<answer>{items!r}</answer>" if items else NO_OBJECTS


def grounding_solution(box: Iterable[int]) -> str:
    """Visual-RFT's grounding answer: `<answer> (x1,y1),(x2,y2) </answer>` in 0..1000 integers."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<answer> ({x1},{y1}),({x2},{y2}) </answer>"


def qwen_input_size(width: int, height: int, *, min_pixels: int = 3136, max_pixels: int = 12845056,
                    factor: int = 28) -> tuple[int, int]:
    """(w, h) of the image Qwen2-VL / Qwen2.5-VL actually sees (its processor's smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(w), int(h)


def to_target(box_pixels: list[float], size: tuple[float, float], frame: tuple[float, float],
              space: BoxSpace) -> list[float]:
    """A pixel box (already inside the image) as a training target in `space` of the `frame`."""
    sx, sy = frame[0] / size[0], frame[1] / size[1]
    x1, y1, x2, y2 = box_pixels
    box = to_space((x1 * sx, y1 * sy, x2 * sx, y2 * sy), frame[0], frame[1], space)
    digits = _ROUNDING.get(space)
    return [int(v) for v in box] if digits is None else [round(v, digits) for v in box]


# ---- reading and checking the json --------------------------------------------------------------


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc


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


def clip_box(box: list[float], size: tuple[float, float]) -> list[float]:
    return [min(max(box[0], 0.0), size[0]), min(max(box[1], 0.0), size[1]),
            min(max(box[2], 0.0), size[0]), min(max(box[3], 0.0), size[1])]


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
        import difflib

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
    `input_size(w, h) -> (w', h')`: the model-input frame for the pixel space (qwen_input_size).
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


def resolve_image(path: Path, size: tuple[float, float] | None, where: str, missing: str) -> Path | None:
    """`path` if it is a readable image (of `size`, when given); None when missing and skipped."""
    if not path.is_file():
        if missing == "skip":
            return None
        raise DataError(f"{where}: image file not found: {path} (set the image folder, or skip missing images)")
    if size is not None:
        try:
            with Image.open(path) as img:
                actual = img.size
        except (UnidentifiedImageError, OSError):
            return path  # no image at all: a bad record for the data check to name, like a truncated one
        if actual != (int(size[0]), int(size[1])):
            raise DataError(f"{where}: {path} is {actual[0]}x{actual[1]} but the file says {size[0]:g}x{size[1]:g}")
    return path


def load_lvis(path: str | Path, **kwargs: Any) -> tuple[list[Record], LoadReport]:
    """`load_coco` for an LVIS json: negatives only from `neg_category_ids`, LVIS fields kept."""
    return load_coco(path, lvis=True, **kwargs)


# ---- the data.train / data.eval spec ------------------------------------------------------------

_SPEC_KEYS = {
    "coco": {"images", "categories", "box_space", "negatives", "seed", "missing", "verify", "ov_split",
             "max_pixels", "min_pixels", "tolerance"},
    "lisa": {"images", "missing", "tolerance"},
}
_SPEC_KEYS["lvis"] = _SPEC_KEYS["coco"]


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`kind:path[?key=value&...]` -> (kind, path, options); unknown kinds or keys are DataErrors."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in _SPEC_KEYS:
        raise DataError(f"{spec}: expected coco:PATH, lvis:PATH or lisa:PATH")
    path, _, query = rest.partition("?")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in _SPEC_KEYS[kind]:
            raise DataError(f"{spec}: unknown option {item!r}; {kind} takes {sorted(_SPEC_KEYS[kind])}")
        options[key] = value
    return kind, path, options


def _negatives(value: str) -> bool | int:
    if value.lower() in ("all", "true"):
        return True
    if value.lower() in ("none", "false", "0"):
        return False
    if value.isdigit():
        return int(value)
    raise DataError(f"negatives must be all, none or a count, got {value!r}")


def load_detection_source(spec: str, *, image_root: str | Path | None = None, limit: int | None = None,
                          box_space: BoxSpace | str | None = None, verbose: bool = True) -> list[Record]:
    """Records for `coco:PATH`, `lvis:PATH` or `lisa:PATH`, with `?key=value&...` options, e.g.
    `coco:ann/instances_val2017.json?images=val2017&categories=coco_fewshot8&negatives=all`.
    Prints the load report to stderr when something was skipped or clipped."""
    kind, path, opt = parse_spec(spec)
    try:
        return _load_spec(kind, path, opt, image_root, limit, box_space, verbose)
    except ValueError as exc:  # a bad option value (seed=x, box_space=...); DataErrors pass through
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{spec}: {exc}") from exc


def _load_spec(kind: str, path: str, opt: dict[str, str], image_root: str | Path | None, limit: int | None,
               box_space: BoxSpace | str | None, verbose: bool) -> list[Record]:
    root = opt.get("images", image_root)
    tolerance = float(opt.get("tolerance", 2.0))
    if kind == "lisa":
        from visual_rft.data.lisa import load_lisa  # lisa builds on this module's helpers

        records, report = load_lisa(path, image_root=root, missing_images=opt.get("missing", "error"),
                                    outside_tolerance=tolerance, limit=limit)
    else:
        space = BoxSpace.parse(opt.get("box_space") or box_space or BoxSpace.QWEN2VL)
        size_fn = None
        if "max_pixels" in opt or "min_pixels" in opt:
            bounds = {k: int(opt[k]) for k in ("min_pixels", "max_pixels") if k in opt}
            size_fn = lambda w, h: qwen_input_size(w, h, **bounds)
        records, report = load_coco(
            path, image_root=root, categories=opt.get("categories"), box_space=space,
            negatives=_negatives(opt.get("negatives", "none")), seed=int(opt.get("seed", 0)),
            missing_images=opt.get("missing", "error"), verify_images=opt.get("verify", "1") not in ("0", "false"),
            input_size=size_fn, outside_tolerance=tolerance, ov_split=opt.get("ov_split"), lvis=kind == "lvis",
            limit=limit)
    if verbose and (report.clipped_boxes or report.collapsed_boxes or any(report.skipped.values())
                    or report.empty_categories):
        print(report.summary(), file=sys.stderr)
    return records


def json_or_jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """(source, row) of a JSON list or a JSONL file."""
    if path.suffix.lower() == ".jsonl":
        yield from jsonl_rows(path)
        return
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:{number}", row

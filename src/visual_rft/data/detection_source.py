"""The `coco:PATH?...`, `lvis:PATH?...` and `lisa:PATH?...` specs: their options, parsed and checked
(unknown kinds, keys and bad values are DataErrors naming the spec), then coco.py or lisa.py."""

from __future__ import annotations

import sys
from pathlib import Path

from visual_rft.data.coco import load_coco
from visual_rft.data.errors import DataError
from visual_rft.data.lisa import load_lisa
from visual_rft.data.record import Record
from visual_rft.data.targets import qwen_input_size
from visual_rft.tasks.boxes import BoxSpace

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

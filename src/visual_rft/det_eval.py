"""Detection and grounding metrics from `evaluate.predict` rows and the records they were made from.

Detection (`detection_metrics`): every row is one (image, category) query. Its completion is parsed
by the task's own parser (`tasks.detection.parse_answer`, the one the reward uses), boxes go back to
pixels of the stored image (`boxes.from_space`, then the model-input frame scaled to `orig_size`),
and the stated confidence is the score. Ground truth is rebuilt from the records' `boxes_pixels`,
`areas` and `crowd` (ignore regions), so with the same detections the numbers equal COCOeval on the
annotation file (tested against pycocotools). Metrics come from faster-coco-eval (0..1, not %):
mAP (IoU .50:.95), AP50, AP75, AP_small/medium/large, AR1/10/100, per-category AP and AP50.
- Open vocabulary: with an `ov_split` field ('base' / 'novel', see data.ov_splits) the report adds
  AP_base / AP_novel / AP_all and the AP50 versions: means of per-category AP over the group, as
  Visual-RFT's notebook averages its selected categories (categories without ground truth are
  left out of every mean and listed in `categories_without_gt`).
- LVIS: records with LVIS fields switch on faster-coco-eval's LVIS mode (`lvis_style=True`:
  detections of categories neither present nor in `neg_category_ids` are dropped, unmatched ones of
  `not_exhaustive_category_ids` ignored, maxDets 300, and we keep the 300 best detections per image
  as the LVIS API does). APr / APc / APf are its frequency-group numbers, which equal the mean
  per-category AP of each group.
Caveat: only queried (image, category) pairs can produce detections. With positive-only queries
(the paper's protocol) no false positive on an absent category is ever counted; load negatives
(`negatives=all`) to measure those.

Grounding (`grounding_metrics`): per sample IoU between the parsed box and the ground truth (the
records' `box_pixels` when given, else the solution's 0..1000 box); a parse failure is IoU 0.
gIoU = mIoU = mean per-sample IoU (LISA's gIoU on boxes; Visual-RFT's box mIoU; the paper's mask
gIoU through SAM is not reproduced); cIoU = summed intersections / summed unions (in pixels with
records, else in the 0..1000 space); acc@0.5 = share of samples with IoU >= 0.5.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from visual_rft.data.record import Record
from visual_rft.tasks import detection, grounding
from visual_rft.tasks.boxes import BoxSpace, from_space, is_finite_box

INSTALL_HINT = "pip install faster-coco-eval==1.8.0"
LVIS_MAX_DETS = 300
_STAT_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")


# ---- rows -> COCO results ------------------------------------------------------------------------


def _aligned(rows: Sequence[dict], records: Sequence[Record]) -> None:
    if len(rows) != len(records):
        raise ValueError(f"{len(rows)} prediction rows for {len(records)} records: they must be aligned")
    for i, (row, record) in enumerate(zip(rows, records)):
        if row.get("source") not in (None, record.source):
            raise ValueError(f"row {i} is for {row['source']!r} but record {i} is {record.source!r}")


def _frames(record: Record) -> tuple[tuple[float, float], tuple[float, float]]:
    """(frame the boxes are written in, stored image size) of a detection record."""
    f = record.fields
    frame = tuple(float(v) for v in f["image_size"])
    orig = tuple(float(v) for v in (f.get("orig_size") or f["image_size"]))
    return frame, orig  # type: ignore[return-value]


def _pixel_box(box: Any, record: Record) -> list[float] | None:
    """xywh in stored-image pixels of a box written in the record's space; None if unusable."""
    if not is_finite_box(box) or not (box[0] < box[2] and box[1] < box[3]):
        return None  # visual_rft mode lets inverted boxes through; COCO would give them negative areas
    frame, orig = _frames(record)
    space = BoxSpace.parse(record.fields.get("box_space") or BoxSpace.QWEN2VL)
    x1, y1, x2, y2 = from_space(box, frame[0], frame[1], space)
    sx, sy = orig[0] / frame[0], orig[1] / frame[1]
    return [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]


def _score(conf: Any) -> float | None:
    if isinstance(conf, bool) or not isinstance(conf, (int, float)):
        return None
    return float(conf) if math.isfinite(conf) else None


def _said_entries(completion: Any, record: Record, mode: str) -> list[tuple[Any, Any, str | None]] | None:
    """(box, confidence, why the strict reward rejects it or None) of every entry of an answer."""
    if mode == "visual_rft":
        parsed = detection.parse_answer(completion, mode=mode, **record.columns())
        return None if parsed is None else [(box, conf, None) for box, conf in parsed]
    entries = detection.answer_entries(completion, **record.columns())
    if entries is None:
        return None
    return [(item.get("Position"), item.get("Confidence"), problem) if isinstance(item, dict) else
            (None, None, problem) for item, problem in entries]


def coco_results(rows: Sequence[dict], records: Sequence[Record], *, mode: str = "strict",
                 max_per_image: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """COCO result entries {image_id, category_id, bbox (xywh pixels), score} and parse counts.

    The metric scores the boxes as the model said them, as pycocotools would on the same boxes: a
    box past the image edge or a confidence outside 0..1 is scored unchanged (pycocotools neither
    clips nor rescales). Entries the strict reward rejects are still counted, by kind, in
    `invalid_predictions/<kind>` (detection.REJECTIONS) and their sum `invalid_predictions`; only
    `malformed` ones (not 4 finite numbers with x1 < x2, y1 < y2, or no finite confidence) cannot be
    scored and are left out. In visual_rft mode the original's parser picks the entries (it
    deduplicates; its reward rejects no box for lying outside the image). `parse_failures` counts
    the answers the reward calls parse failures (strict: no list, or no entry it accepts); their
    scoreable entries are still scored. `max_per_image` keeps the highest-scored per image.
    """
    _aligned(rows, records)
    results: list[dict] = []
    counts = {"queries": len(rows), "parse_failures": 0, "invalid_predictions": 0,
              **{f"invalid_predictions/{kind}": 0 for kind in detection.REJECTIONS}}
    for row, record in zip(rows, records):
        entries = _said_entries(row.get("completion", ""), record, mode)
        # the reward's own view: no list, or (strict) no entry it accepts, is a parse failure
        if entries is None or (entries and all(problem is not None for *_, problem in entries)):
            counts["parse_failures"] += 1
        for box, conf, problem in entries or []:
            bbox, score = _pixel_box(box, record), _score(conf)
            if bbox is None or score is None:
                problem = detection.MALFORMED
            if problem is not None:
                counts["invalid_predictions"] += 1
                counts[f"invalid_predictions/{problem}"] += 1
            if problem == detection.MALFORMED:
                continue
            results.append({"image_id": record.fields["image_id"], "category_id": record.fields["category_id"],
                            "bbox": bbox, "score": score})
    if max_per_image is not None:
        by_image: dict[Any, list[dict]] = defaultdict(list)
        for entry in results:
            by_image[entry["image_id"]].append(entry)
        results = [e for entries in by_image.values()
                   for e in sorted(entries, key=lambda e: -e["score"])[:max_per_image]]
    counts["detections"] = len(results)
    return results, counts


# ---- records -> COCO ground truth ----------------------------------------------------------------


def coco_ground_truth(records: Sequence[Record]) -> dict[str, Any]:
    """A COCO-format ground-truth dict of the evaluated images and categories (LVIS fields kept)."""
    images: dict[Any, dict] = {}
    categories: dict[Any, dict] = {}
    annotations: list[dict] = []
    seen: dict[tuple[Any, Any], Record] = {}
    for record in records:
        f = record.fields
        _, (w, h) = _frames(record)
        image = images.setdefault(f["image_id"], {"id": f["image_id"], "width": w, "height": h})
        if (image["width"], image["height"]) != (w, h):
            raise ValueError(f"{record.source}: image {f['image_id']!r} has two sizes in the records")
        if "neg_category_ids" in f:
            image["neg_category_ids"] = f["neg_category_ids"]
            image["not_exhaustive_category_ids"] = f.get("not_exhaustive_category_ids", [])
        category = categories.setdefault(f["category_id"], {"id": f["category_id"], "name": f["category"]})
        if f.get("frequency"):
            category["frequency"] = f["frequency"]
        key = (f["image_id"], f["category_id"])
        if key in seen:
            if seen[key].fields.get("boxes_pixels") != f.get("boxes_pixels"):
                raise ValueError(f"{record.source}: conflicts with {seen[key].source} (same image and category)")
            continue
        seen[key] = record
        annotations += _annotations(record, len(annotations))
    return {"images": list(images.values()), "categories": list(categories.values()), "annotations": annotations}


def _annotations(record: Record, offset: int) -> list[dict]:
    f = record.fields
    boxes = [(b, a, 0) for b, a in zip(f.get("boxes_pixels", []), f.get("areas") or [None] * len(f["boxes_pixels"]))]
    boxes += [(c[:4], c[4], 1) for c in f.get("crowd", [])]
    out = []
    for i, (box, area, crowd) in enumerate(boxes, start=offset + 1):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"id": i, "image_id": f["image_id"], "category_id": f["category_id"], "iscrowd": crowd,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area if area is not None else (x2 - x1) * (y2 - y1))})
    return out


# ---- metrics -------------------------------------------------------------------------------------


def _coco_eval(gt: dict, results: list[dict], lvis: bool) -> Any:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as exc:
        raise ImportError(f"detection metrics need faster-coco-eval: {INSTALL_HINT}") from exc
    quiet = lambda *args, **kwargs: None
    coco_gt = COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", lvis_style=lvis, print_function=quiet)
    if lvis:
        evaluator.params.maxDets = [LVIS_MAX_DETS]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def _per_category(evaluator: Any, gt: dict) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per-category AP and AP50 (None without ground truth), as the release's coco_evaluation.py."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall, category, area, maxDets]
    ap, ap50 = {}, {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        for table, values in ((ap, precision[:, :, k, 0, -1]), (ap50, precision[0, :, k, 0, -1])):
            valid = values[values > -1]
            table[names[cat_id]] = float(valid.mean()) if valid.size else None
    return ap, ap50


def _group_means(records: Sequence[Record], key: str, ap: dict, ap50: dict) -> dict[str, float | None]:
    groups: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.fields.get(key):
            groups[str(record.fields[key])].add(record.fields["category"])
    if not groups:
        return {}
    groups["all"] = set().union(*groups.values())
    out: dict[str, float | None] = {}
    for group, names in sorted(groups.items()):
        for label, table in (("AP", ap), ("AP50", ap50)):
            values = [table[n] for n in names if table.get(n) is not None]
            out[f"{label}_{group}"] = sum(values) / len(values) if values else None
    return out


DETECTION_FIELDS = ("image_id", "category_id", "category", "boxes_pixels", "image_size")


def has_detection_fields(records: Sequence[Record]) -> bool:
    """True when every record carries what COCO metrics need (coco:/lvis:/embedded:trees records do;
    Visual-RFT's published parquet / save_to_disk sets carry only problem and solution)."""
    return bool(records) and all(all(k in r.fields for k in DETECTION_FIELDS) for r in records)


def detection_metrics(rows: Sequence[dict], records: Sequence[Record], *, mode: str = "strict",
                      lvis: bool | None = None) -> dict[str, Any]:
    """COCO / LVIS / open-vocabulary metrics of aligned prediction rows and detection records."""
    if not has_detection_fields(records):
        missing = next((r.source for r in records if not all(k in r.fields for k in DETECTION_FIELDS)), "")
        raise ValueError(f"COCO metrics need records with fields {list(DETECTION_FIELDS)} ({missing or 'no records'} "
                         "lacks some): evaluate on coco:, lvis: or embedded:trees data")
    if lvis is None:
        lvis = any("neg_category_ids" in r.fields for r in records)
    results, counts = coco_results(rows, records, mode=mode, max_per_image=LVIS_MAX_DETS if lvis else None)
    gt = coco_ground_truth(records)
    evaluator = _coco_eval(gt, results, lvis)
    stats = [float(v) for v in evaluator.stats]
    names = _STAT_NAMES if not lvis else _STAT_NAMES[:6]  # LVIS mode has a single maxDets (300)
    metrics: dict[str, Any] = {name: (v if v >= 0 else None) for name, v in zip(names, stats)}
    if lvis:
        labels = evaluator.stats_as_dict  # LVIS labels its only AR (maxDets 300) "AR_all"
        for name in ("AR_all", "APr", "APc", "APf"):
            value = labels.get(name)
            metrics[name.replace("AR_all", "AR300")] = float(value) if value is not None and value >= 0 else None
    ap, ap50 = _per_category(evaluator, gt)
    metrics.update(_group_means(records, "ov_split", ap, ap50))
    metrics.update(counts)
    metrics["ground_truth_boxes"] = sum(1 for a in gt["annotations"] if not a["iscrowd"])
    metrics["categories_without_gt"] = sorted(n for n, v in ap.items() if v is None)
    metrics["per_category_AP"] = ap
    metrics["per_category_AP50"] = ap50
    return metrics


def grounding_metrics(rows: Sequence[dict], records: Sequence[Record] | None = None, *,
                      mode: str = "strict") -> dict[str, Any]:
    """mIoU / gIoU (mean per-sample IoU), cIoU (cumulative), acc@0.5 and the parse-failure count."""
    if not rows:
        raise ValueError("grounding metrics need at least one row")
    if records is not None:
        _aligned(rows, records)
    ious, inter_sum, union_sum, failures = [], 0.0, 0.0, 0
    for i, row in enumerate(rows):
        pred = grounding.parse_answer(row.get("completion", ""), mode=mode)
        gt: Sequence[float] = grounding.parse_solution(row["solution"])
        scale = (1.0, 1.0)
        if records is not None and "box_pixels" in records[i].fields:
            w, h = (float(v) for v in records[i].fields["image_size"])
            gt, scale = records[i].fields["box_pixels"], (w, h)
        if pred is None:
            failures += 1
            ious.append(0.0)
            union_sum += grounding.box_area(gt)
            continue
        if scale != (1.0, 1.0):
            pred = from_space(pred, scale[0], scale[1], BoxSpace.QWEN2VL)
        ious.append(grounding.box_iou(pred, gt))
        inter_sum += grounding.box_intersection(pred, gt)
        union_sum += grounding.box_union(pred, gt)
    n = len(ious)
    mean_iou = sum(ious) / n
    return {"mIoU": mean_iou, "gIoU": mean_iou, "cIoU": inter_sum / union_sum if union_sum > 0 else 0.0,
            "acc@0.5": sum(v >= 0.5 for v in ious) / n, "grounding_samples": n, "parse_failures": failures}

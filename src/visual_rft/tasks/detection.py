"""Object-detection verifier: `iou`, `confidence` and `format` rewards, parser and matcher.

Columns: `solution` (`<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>`
or `<answer>No Objects</answer>`), optional `box_space` ("qwen2vl" default, "pixels",
"normalized"; see boxes.BoxSpace) and `image_size` ((w, h), used for the pixel-space limits).

`visual_rft` mode is the original `grpo.py` to the letter (VISUAL_RFT_REWARDS.md, "Detection"),
without math_verify; it ignores `box_space`, as the original had none. Where the original returns
NaN (`Confidence: NaN`, or +inf and -inf confidences summed) we return 0.0, and wherever it
raised (RecursionError, IndexError on `[]`, TypeError on None ground truth or a string
confidence, OverflowError on huge integers...) we return 0.0 as its `except Exception` did.

`strict` mode (default) fixes, on purpose:
- A correct "No Objects" (or `[]`) on a solution without boxes scores iou 1 and confidence 1;
  the original gave 0 to every answer there. On a solution with boxes it scores 0 and 0.
- Parsing: exactly one `<answer>` block, which may span lines; `json.loads` (single quotes
  accepted as double quotes) of at most MAX_PARSE_CHARS, with no `[[` / truncation repairs and
  no eval. More than MAX_BOXES entries, a non-list, or nothing parseable is a parse failure.
- Validity per entry: `Position` must be 4 finite numbers (no bools) with x1 < x2, y1 < y2,
  inside [0, limit] of the box space (pixel space: the image size when `image_size` is given,
  else only >= 0); `Confidence` a finite number in [0, 1]. NaN and Infinity are invalid, never
  NaN rewards. An invalid entry is never matched but still counts as a prediction: it adds to
  the iou denominator and scores 0 in the confidence mean, so a malformed entry never scores
  better than a wrong box would.
  If every entry is invalid the answer is a parse failure.
- IoU >= 0.5 is a hit (the usual detection convention; the original needed > 0.5).
- No deduplication of predictions: a repeated box is a false positive (it scores 1 - conf and
  counts in the denominator) instead of silently dropped with its confidence. Exact duplicate
  ground-truth boxes are merged, so they no longer inflate the denominator.
- A malformed solution raises ValueError (a data bug should be loud, not a silent 0).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Sequence

from .boxes import Box, BoxSpace, is_finite_box, is_valid_box, iou, space_limits
from .common import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    check_mode,
    column,
    completion_text,
    extract_answer,
    first_answer_oneline,
    format_reward,
    required_column,
    solution_answer,
)

MAX_BOXES = 100
IOU_THRESHOLD = 0.5

Prediction = tuple[Box, float]


# ---------------------------------------------------------------- visual_rft (the original)

def _visual_rft_extract_bbox(text: str) -> Any:
    """The original `extract_bbox`: the JSON after the first `<answer>`, with its truncation repair.

    Returns None when there is no `<answer>` or on JSONDecodeError; other errors (RecursionError,
    the int-digits ValueError) propagate, as they did, to the caller's catch-all.
    """
    if ANSWER_OPEN not in text:
        return None
    start = text.find(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE)  # searched from 0, not from `start`, as in the original
    content = text[start:(len(text) if end == -1 else end)]
    if not content.endswith("]"):
        content = content.rsplit("},", 1)[0] + "}]"
    try:
        return json.loads(content.replace("'", '"'))
    except json.JSONDecodeError:
        return None


def _visual_rft_prediction(completion: str) -> Any:
    found = first_answer_oneline(completion)
    answer = (found if found is not None else completion).strip()
    wrapped = (ANSWER_OPEN + answer + ANSWER_CLOSE).replace("[[", "[").replace("]]", "]").replace("\n", "")
    return _visual_rft_extract_bbox(wrapped)


def _visual_rft_iou(gt: Any, pred: Any) -> float:
    # Raw coordinates, ground truth first in every max/min (that order decides ties and NaNs).
    gx1, gy1, gx2, gy2 = gt
    px1, py1, px2, py2 = pred
    ix1, iy1, ix2, iy2 = max(gx1, px1), max(gy1, py1), min(gx2, px2), min(gy2, py2)
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    return inter / ((gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter)


def _visual_rft_match(gt_list: Any, preds: list) -> list[tuple[Any, Any]]:
    """Greedy, by confidence (stable, descending); a hit needs IoU strictly above 0.5."""
    results, used = [], set()
    for pred in sorted(preds, key=lambda p: p["Confidence"], reverse=True):
        best, best_index = 0, -1
        for i, gt in enumerate(gt_list):
            if i not in used:
                value = _visual_rft_iou(gt["Position"], pred["Position"])
                if value > best:
                    best, best_index = value, i
        if best > 0.5:
            results.append((best, pred["Confidence"]))
            used.add(best_index)
        else:
            results.append((0, pred["Confidence"]))
    return results


def _visual_rft_dedup(preds: list) -> list:
    seen, unique = set(), []
    for pred in preds:
        key = tuple(pred["Position"])
        if key not in seen:
            seen.add(key)
            unique.append(pred)
    return unique


def _visual_rft_scores(completion: str, solution: str) -> tuple[float, float]:
    """(iou, confidence) as the original computes them; (0, 0) wherever it raised."""
    try:
        gt_list = _visual_rft_extract_bbox(solution.strip())
        preds = _visual_rft_prediction(completion)
        if preds is None or type(preds[0]) is not dict:
            return 0.0, 0.0
        results = _visual_rft_match(gt_list, _visual_rft_dedup(preds))
        iou_sum, conf_sum = 0.0, 0.0
        for value, conf in results:
            iou_sum += value
            conf_sum += (1 - value) * (1 - conf) if value == 0 else conf
        iou_reward = min(iou_sum / max(len(gt_list), len(results)), 1.0)
        conf_reward = min(max(conf_sum / len(results), 0.0), 1.0)
    except Exception:  # noqa: BLE001 - the original's catch-all is the behaviour being reproduced
        return 0.0, 0.0
    # NaN survives the original's clipping; our contract is finite rewards, so it becomes 0.
    return (iou_reward if math.isfinite(iou_reward) else 0.0, conf_reward if math.isfinite(conf_reward) else 0.0)


def _visual_rft_parse(completion: str) -> list[tuple[Any, Any]] | None:
    try:
        preds = _visual_rft_prediction(completion)
        if preds is None or type(preds[0]) is not dict:
            return None
        return [(tuple(p["Position"]), p["Confidence"]) for p in _visual_rft_dedup(preds)]
    except Exception:  # noqa: BLE001 - every failure the original hit scores 0, so it is a parse failure
        return None


# ---------------------------------------------------------------- strict

def _reject_constant(_: str) -> None:
    # NaN / Infinity become null, so the entry holding them is invalid rather than the whole answer.
    return None


def _load_list(text: str) -> list | None:
    """json.loads of a list, trying single quotes as double quotes second; None if neither works."""
    for candidate in (text, text.replace("'", '"')):
        try:
            value = json.loads(candidate, parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is the int-digits limit
            continue
        return value if isinstance(value, list) else None
    return None


def _is_no_objects(answer: str) -> bool:
    return " ".join(answer.strip(" \t'\"`.*").split()).casefold() == "no objects"


def _limits(box_space: Any, image_size: Any) -> tuple[float, float]:
    space = BoxSpace.parse(box_space if box_space is not None else BoxSpace.QWEN2VL)
    if space is BoxSpace.PIXELS and image_size is None:
        return math.inf, math.inf
    width, height = image_size if space is BoxSpace.PIXELS else (None, None)
    return space_limits(space, width, height)


# Why the strict reward rejects an entry (det_eval counts each kind; a malformed entry is no box at all).
MALFORMED, OUT_OF_IMAGE, BAD_CONFIDENCE = "malformed", "out_of_image", "confidence_out_of_range"
REJECTIONS = (MALFORMED, OUT_OF_IMAGE, BAD_CONFIDENCE)


def entry_problem(item: Any, xmax: float, ymax: float) -> str | None:
    """None for an entry the strict reward accepts, else why not (one of REJECTIONS)."""
    if not isinstance(item, dict):
        return MALFORMED
    box, conf = item.get("Position"), item.get("Confidence")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not _finite_number(conf):
        return MALFORMED
    if not is_finite_box(box) or not (box[0] < box[2] and box[1] < box[3]):
        return MALFORMED
    if not is_valid_box(box, xmax, ymax):
        return OUT_OF_IMAGE
    return None if 0 <= conf <= 1 else BAD_CONFIDENCE


def _finite_number(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def answer_entries(completion: Any, *, box_space: Any = None, image_size: Any = None,
                   **_: Any) -> list[tuple[Any, str | None]] | None:
    """Every entry of a strict answer with why the strict reward rejects it (None = accepted);
    [] for 'No Objects'; None when the answer itself does not parse (no single <answer> block
    holding a JSON list of at most MAX_BOXES entries)."""
    xmax, ymax = _limits(box_space, image_size)
    answer = extract_answer(completion_text(completion))
    if not answer:
        return None
    if _is_no_objects(answer):
        return []
    items = _load_list(answer)
    if items is None or len(items) > MAX_BOXES:
        return None
    return [(item, entry_problem(item, xmax, ymax)) for item in items]


def _strict_parse(completion: str, box_space: Any, image_size: Any) -> tuple[list[Prediction], int] | None:
    """(valid predictions, number of invalid entries), or None on a parse failure."""
    entries = answer_entries(completion, box_space=box_space, image_size=image_size)
    if entries is None:
        return None
    valid = [(tuple(float(v) for v in item["Position"]), float(item["Confidence"]))
             for item, problem in entries if problem is None]
    if entries and not valid:
        return None
    return valid, len(entries) - len(valid)


@functools.lru_cache(maxsize=4096)
def _parse_solution_cached(answer: str) -> tuple[Box, ...]:
    if _is_no_objects(answer):
        return ()
    items = _load_list(answer)
    if items is None:
        raise ValueError(f"detection solution is neither 'No Objects' nor a JSON list of boxes: {answer[:200]!r}")
    boxes: list[Box] = []
    for item in items:
        box = item.get("Position") if isinstance(item, dict) else None
        if not is_finite_box(box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"detection solution has a malformed box {item!r}")
        box = tuple(float(v) for v in box)
        if box not in boxes:  # exact duplicates would inflate the iou denominator
            boxes.append(box)
    return tuple(boxes)


def parse_solution(solution: str) -> list[Box]:
    """The ground-truth boxes of a solution (strict); [] for 'No Objects'. ValueError if malformed."""
    return list(_parse_solution_cached(solution_answer(solution)))


def match_predictions(
    predictions: Sequence[Prediction], gt_boxes: Sequence[Box], threshold: float = IOU_THRESHOLD
) -> list[tuple[int | None, float]]:
    """Greedy matching, most confident first (ties keep input order).

    Each prediction takes the unmatched ground-truth box of highest IoU (the first on ties) if
    that IoU is >= `threshold` (must be > 0). Returns, in input order, (matched gt index or None,
    IoU of the match or 0.0). Eval reuses this for precision/recall/AP at other thresholds.
    """
    out: list[tuple[int | None, float]] = [(None, 0.0)] * len(predictions)
    used: set[int] = set()
    for k in sorted(range(len(predictions)), key=lambda k: -predictions[k][1]):
        best, best_index = 0.0, None
        for i, gt in enumerate(gt_boxes):
            if i not in used:
                value = iou(predictions[k][0], gt)
                if value > best:
                    best, best_index = value, i
        if best_index is not None and best >= threshold:
            used.add(best_index)
            out[k] = (best_index, best)
    return out


def _strict_scores(completion: str, solution: str, box_space: Any, image_size: Any) -> tuple[float, float]:
    gt = parse_solution(solution)
    parsed = _strict_parse(completion, box_space, image_size)
    if parsed is None:
        return 0.0, 0.0
    preds, n_invalid = parsed
    n_pred = len(preds) + n_invalid
    if n_pred == 0:  # "No Objects": right exactly when there is nothing to find
        return (0.0, 0.0) if gt else (1.0, 1.0)
    matches = match_predictions(preds, gt)
    iou_sum = sum(value for _, value in matches)
    conf_sum = sum(conf if index is not None else 1.0 - conf for (_, conf), (index, _) in zip(preds, matches))
    return iou_sum / max(len(gt), n_pred), conf_sum / n_pred


# ---------------------------------------------------------------- public API

def score_sample(
    completion: str, solution: str, *, mode: str = "strict", box_space: Any = None, image_size: Any = None
) -> tuple[float, float]:
    """(iou reward, confidence reward) of one completion, both in [0, 1]."""
    text = completion_text(completion)
    if check_mode(mode) == "visual_rft":
        return _visual_rft_scores(text, completion_text(solution))
    return _strict_scores(text, solution, box_space, image_size)


def parse_answer(
    completion: str, *, mode: str = "strict", box_space: Any = None, image_size: Any = None, **_: Any
) -> list[Prediction] | None:
    """The predicted (box, confidence) pairs of one completion, or None on a parse failure.

    strict: the valid entries ([] for a 'No Objects' answer), boxes as float tuples in the row's
    box space. visual_rft: the original's deduplicated entries as (tuple(Position), Confidence),
    None wherever the original would score 0 for parsing reasons (including a `[]` answer).
    """
    text = completion_text(completion)
    if check_mode(mode) == "visual_rft":
        return _visual_rft_parse(text)
    parsed = _strict_parse(text, box_space, image_size)
    return None if parsed is None else parsed[0]


def _all_scores(completions: list[Any], solution: Any, mode: str, columns: dict) -> list[tuple[float, float]]:
    check_mode(mode)
    n = len(completions)
    solutions = required_column(solution, "solution", n)
    spaces = column(columns, "box_space", n)
    sizes = column(columns, "image_size", n)
    return [
        score_sample(c, sol, mode=mode, box_space=space, image_size=size)
        for c, sol, space, size in zip(completions, solutions, spaces, sizes)
    ]


def iou_reward(
    completions: list[Any], *, solution: Any = None, mode: str = "strict", **columns: Any
) -> list[float]:
    """Summed IoU of matched predictions over max(#ground truth, #predictions), in [0, 1]."""
    return [s[0] for s in _all_scores(completions, solution, mode, columns)]


def confidence_reward(
    completions: list[Any], *, solution: Any = None, mode: str = "strict", **columns: Any
) -> list[float]:
    """Mean over predictions of conf if matched else 1 - conf, in [0, 1]."""
    return [s[1] for s in _all_scores(completions, solution, mode, columns)]


REWARDS: dict[str, Callable[..., list]] = {
    "iou": iou_reward,
    "confidence": confidence_reward,
    "format": format_reward,
}

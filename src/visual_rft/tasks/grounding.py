"""Reasoning-grounding verifier (LISA): `giou` and `format` rewards, the box parser, IoU helpers.

The solution is `<answer> (x1,y1),(x2,y2) </answer>` with integers 0..1000 relative to the image
(the Qwen2-VL space, `boxes.BoxSpace.QWEN2VL`). Eval computes LISA's gIoU (the mean of
per-sample IoUs, not the reward's generalised IoU) and cIoU (summed intersections over summed
unions) from `parse_answer`, `parse_solution`, `box_iou`, `box_intersection` and `box_union`.

`visual_rft` mode is the original `grpo_lisa.accuracy_reward` (VISUAL_RFT_REWARDS.md,
"Grounding"), without math_verify: GIoU + 1 on signed areas, boxes from Unicode-digit `(x,y)`
pairs, 2.0 for an exact string match. Its value is kept wherever it lies in the nominal range
[0, 2]; outside it (the original reached 6.09 for `(1000,1000),(0,0)` and about -1.7e24 for huge
integers) and for NaN the reward is 0.0, so the signal stays bounded. Parse errors (no box, an
integer too long for `int()` or for float division) give 0.0 as the original's handler did.

`strict` mode (default) fixes:
- Unbounded / signed-area GIoU: reward = (GIoU + 1) / 2 in [0, 1], on a proper box only.
- The box must be exactly one `(x1,y1),(x2,y2)` (ASCII digits, x1 < x2, y1 < y2, within
  0..1000) filling the one `<answer>` block; no box read out of the think text, no pairing of
  two top-left corners from a multi-box answer (that is a parse failure), no inverted box
  scoring 2.0, no Unicode digits.
- No exact-string bonus: the same box scores the same whatever its spacing, and a degenerate
  box never scores.
- A malformed solution raises ValueError (a data bug, not a 0 reward).
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Callable

from .boxes import QWEN2VL_SCALE, area, giou, intersection_area, iou, union_area
from .common import (
    check_mode,
    completion_text,
    extract_answer,
    first_answer_dotall,
    first_answer_oneline,
    format_reward,
    required_column,
    solution_answer,
)

IntBox = tuple[int, int, int, int]

# The original's pattern: `\d` is Unicode, so Arabic-Indic or full-width digits count there.
_VISUAL_RFT_BOX = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_LONG_DIGIT_RUN = re.compile(r"(?<!\d)\d{301}")
# Strict: ASCII digits and whitespace, at most 4 digits (0..1000), so int() is always cheap.
_STRICT_BOX = re.compile(
    r"\(\s*([0-9]{1,4})\s*,\s*([0-9]{1,4})\s*\)\s*,\s*\(\s*([0-9]{1,4})\s*,\s*([0-9]{1,4})\s*\)", re.ASCII
)

box_iou = iou
box_giou = giou
box_intersection = intersection_area
box_union = union_area
box_area = area


# ---------------------------------------------------------------- visual_rft (the original)

def _visual_rft_corners(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first two points of the original's list (first corners of every `(x,y),(x,y)` match,
    then all second corners): one box's corners, or with several boxes two top-left corners.

    Raises where the original raised: IndexError without a match, ValueError from int() past
    4300 digits, OverflowError from `/ 1000` past float range. The original converted every
    match; only a number over 300 digits can fail, so the rest are converted only when such a
    run exists (a lookbehind anchors the search at run starts, keeping it linear).
    """
    matches = [m.groups() for m in itertools.islice(_VISUAL_RFT_BOX.finditer(text), 2)]
    if _LONG_DIGIT_RUN.search(text):
        for groups in _VISUAL_RFT_BOX.findall(text):
            for digits in groups:
                if len(digits) > 300:
                    int(digits) / 1000
    corners = [(int(x1), int(y1)) for x1, y1, _, _ in matches] + [(int(x2), int(y2)) for _, _, x2, y2 in matches]
    return corners[0], corners[1]


def _visual_rft_points(corners: tuple[tuple[int, int], ...]) -> list[tuple[float, float]]:
    # int / 1000 is a true division, as in the original (OverflowError beyond float range).
    return [(x / 1000, y / 1000) for x, y in corners]


def _visual_rft_giou_plus_one(gt: list, st: list) -> float:
    """The original's GIoU + 1 on the first two points of each side, signed areas, gt first."""
    (gx1, gy1), (gx2, gy2) = gt[0], gt[1]
    (sx1, sy1), (sx2, sy2) = st[0], st[1]
    inter = max(0, min(gx2, sx2) - max(gx1, sx1)) * max(0, min(gy2, sy2) - max(gy1, sy1))
    union = (gx2 - gx1) * (gy2 - gy1) + (sx2 - sx1) * (sy2 - sy1) - inter
    value = inter / union if union > 0 else 0
    enclosing = (max(gx2, sx2) - min(gx1, sx1)) * (max(gy2, sy2) - min(gy1, sy1))
    if enclosing > 0:
        value = value - (enclosing - union) / enclosing
    return value + 1


def _visual_rft_answers(completion: str, solution: str) -> tuple[str, str]:
    gt = first_answer_oneline(solution)
    st = first_answer_dotall(completion)  # the original used DOTALL on the completion only
    return (gt if gt is not None else solution).strip(), (st if st is not None else completion).strip()


def _visual_rft_reward(completion: str, solution: str) -> float:
    gt, st = _visual_rft_answers(completion, solution)
    if st == gt:
        return 2.0  # applied last in the original, so it overrides any box score
    try:
        gt_points = _visual_rft_points(_visual_rft_corners(gt))
        value = _visual_rft_giou_plus_one(gt_points, _visual_rft_points(_visual_rft_corners(st)))
    except (IndexError, ValueError, OverflowError, ZeroDivisionError):
        return 0.0  # no box on a side, or an integer int()/float division cannot take
    return float(value) if 0.0 <= value <= 2.0 else 0.0  # NaN fails the test too


def _visual_rft_parse(completion: str) -> IntBox | None:
    _, st = _visual_rft_answers(completion, "")
    try:
        corners = _visual_rft_corners(st)
        _visual_rft_points(corners)  # the reward fails on what this division fails on
    except (IndexError, ValueError, OverflowError):
        return None
    return corners[0] + corners[1]


# ---------------------------------------------------------------- strict

def _strict_box(text: str, *, proper: bool) -> IntBox | None:
    match = _STRICT_BOX.fullmatch(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in match.groups())
    if max(x1, y1, x2, y2) > QWEN2VL_SCALE:
        return None
    ordered = (x1 < x2 and y1 < y2) if proper else (x1 <= x2 and y1 <= y2)
    return (x1, y1, x2, y2) if ordered else None


@functools.lru_cache(maxsize=4096)
def _solution_box(answer: str) -> IntBox:
    # Ground truth built with int(coord / W * 1000) can be degenerate for a tiny object: allowed.
    box = _strict_box(answer, proper=False)
    if box is None:
        raise ValueError(f"grounding solution is not one '(x1,y1),(x2,y2)' box in 0..1000: {answer[:200]!r}")
    return box


def parse_solution(solution: str) -> IntBox:
    """The ground-truth box (0..1000 integers) of a solution; ValueError if malformed."""
    return _solution_box(solution_answer(solution))


def parse_answer(completion: str, *, mode: str = "strict", **_: Any) -> IntBox | None:
    """The predicted box as (x1, y1, x2, y2) integers in 0..1000, or None on a parse failure.

    visual_rft: the box the original scores (first corners of the first two boxes when there are
    several), as written, possibly inverted or out of range.
    """
    text = completion_text(completion)
    if check_mode(mode) == "visual_rft":
        return _visual_rft_parse(text)
    answer = extract_answer(text)
    return None if answer is None else _strict_box(answer, proper=True)


def _strict_reward(completion: str, solution: str) -> float:
    gt = parse_solution(solution)
    pred = parse_answer(completion, mode="strict")
    if pred is None:
        return 0.0
    return min(1.0, max(0.0, (giou(pred, gt) + 1.0) / 2.0))


def score_sample(completion: str, solution: str, *, mode: str = "strict") -> float:
    """The giou reward of one completion: [0, 1] in strict mode, [0, 2] in visual_rft mode."""
    text, sol = completion_text(completion), completion_text(solution)
    if check_mode(mode) == "visual_rft":
        return _visual_rft_reward(text, sol)
    return _strict_reward(text, sol)


def giou_reward(completions: list[Any], *, solution: Any = None, mode: str = "strict", **_: Any) -> list[float]:
    """GIoU-based box reward per completion (see the module doc for each mode's range)."""
    check_mode(mode)
    solutions = required_column(solution, "solution", len(completions))
    return [score_sample(c, sol, mode=mode) for c, sol in zip(completions, solutions)]


REWARDS: dict[str, Callable[..., list]] = {
    "giou": giou_reward,
    "format": format_reward,
}

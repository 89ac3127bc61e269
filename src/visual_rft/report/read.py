"""Streaming readers behind the run report: downsampled metric curves, a bounded sample of rollout
groups and bounded eval tallies. None of them holds more than a bounded part of a run's files in
memory, so a report of a long run (a 1 GB rollouts.jsonl) stays fast and small."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MAX_CURVE_POINTS = 2000
MAX_GROUP_ROWS = 64  # completions shown per rollout group; G is 8 in the paper
MAX_CONFUSION_CELLS = 100_000  # distinct (label, prediction) pairs before rare predictions fold into OTHER
OTHER, NO_ANSWER = "(other)", "(no answer)"
TOOL_KEYS = {"turns", "tool_calls", "truncated"}  # a tool conversation's fields (tool_eval.py): no rewards
ROLLOUT_KEYS = {"step", "source", "prompt", "solution", "completion", "advantage", *TOOL_KEYS}
PREDICTION_KEYS = {"source", "solution", "completion", "prediction", "parse_failed", "label", "completion_tokens",
                   *TOOL_KEYS}


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file, one line at a time. A run killed mid-write leaves a torn last line;
    the report shows what is readable rather than refusing the whole run."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            row = _loads(line)
            if row is not None:
                yield row


def _loads(line: str) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Series:
    """At most `max_points` (step, value) points of a stream: when the list fills up, neighbouring
    pairs are averaged and later points arrive in buckets twice as wide, so every kept point is the
    mean of the same number of raw points and memory never grows past `max_points`."""

    def __init__(self, max_points: int = MAX_CURVE_POINTS) -> None:
        self.max_points = max(2, max_points)
        self.steps: list[float] = []
        self.values: list[float] = []
        self.stride = 1
        self._sum_step = self._sum_value = 0.0
        self._n = 0

    def add(self, step: float, value: float) -> None:
        self._sum_step += step
        self._sum_value += value
        self._n += 1
        if self._n == self.stride:
            self.steps.append(self._sum_step / self._n)
            self.values.append(self._sum_value / self._n)
            self._sum_step = self._sum_value = 0.0
            self._n = 0
            if len(self.steps) >= self.max_points:
                self.steps, self.values = _halve(self.steps), _halve(self.values)
                self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """The kept points plus the partly filled last bucket (so the last step is always shown)."""
        if self._n == 0:
            return list(self.steps), list(self.values)
        return self.steps + [self._sum_step / self._n], self.values + [self._sum_value / self._n]


def _halve(xs: list[float]) -> list[float]:
    return [(xs[i] + xs[i + 1]) / 2 if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]


def read_curves(path: str | Path, max_points: int = MAX_CURVE_POINTS) -> dict[str, Series]:
    """Every numeric key of a metrics.jsonl as a downsampled series over `step`."""
    curves: dict[str, Series] = {}
    for row in iter_jsonl(path):
        step = row.get("step")
        if not is_number(step):
            continue
        for key, value in row.items():
            if key != "step" and is_number(value):
                curves.setdefault(key, Series(max_points)).add(step, value)
    return curves


# ---------------------------------------------------------------- rollouts

# The trainer writes `{"step": N, "source": "...", ...}`: reading those two fields with a regex
# keeps the counting pass cheap on a large file; other layouts fall back to json.loads.
_HEAD = re.compile(r'\{\s*"step":\s*(-?\d+),\s*"source":\s*("(?:[^"\\]|\\.)*"|null)')


def _group_key(line: str) -> tuple[int, str] | None:
    match = _HEAD.match(line)
    if match:
        return int(match.group(1)), match.group(2)
    row = _loads(line)
    if row is None or not is_number(row.get("step")):
        return None
    return int(row["step"]), json.dumps(row.get("source"))


def _groups(path: Path) -> Iterator[tuple[int, int, str]]:
    """(step, index of the group within its step, line) for every row. A group is a run of
    consecutive rows with the same step and source: the G completions of one prompt."""
    last: tuple[int, str] | None = None
    index: dict[int, int] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            key = _group_key(line)
            if key is None:
                continue
            if key != last:
                index[key[0]] = index.get(key[0], -1) + 1
                last = key
            yield key[0], index[key[0]], line


def choose_groups(groups_per_step: dict[int, int], budget: int) -> set[tuple[int, int]]:
    """(step, group index) pairs: at most `budget`, on steps spread evenly from the first logged
    step to the last, about the same number of groups on each chosen step."""
    steps = sorted(groups_per_step)
    if budget <= 0 or not steps:
        return set()
    n = min(len(steps), budget)
    picked = sorted({steps[round(i * (len(steps) - 1) / max(n - 1, 1))] for i in range(n)})
    share, extra = divmod(budget, len(picked))  # the remainder goes to the earliest chosen steps
    return {(s, g) for i, s in enumerate(picked) for g in range(min(share + (i < extra), groups_per_step[s]))}


@dataclass
class RolloutGroup:
    step: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0  # rows of the group beyond MAX_GROUP_ROWS, counted but not kept


def sample_rollouts(path: str | Path, budget: int) -> tuple[list[RolloutGroup], int]:
    """A bounded, evenly spread sample of rollout groups, and how many groups the file holds.
    Two streaming passes: count groups per step, then keep only the chosen groups' rows."""
    path = Path(path)
    counts: dict[int, int] = {}
    for step, index, _ in _groups(path):
        counts[step] = max(counts.get(step, 0), index + 1)
    chosen = choose_groups(counts, budget)
    kept: dict[tuple[int, int], RolloutGroup] = {}
    for step, index, line in _groups(path):
        if (step, index) not in chosen:
            continue
        group = kept.setdefault((step, index), RolloutGroup(step))
        row = _loads(line)
        if row is None:
            continue
        if len(group.rows) < MAX_GROUP_ROWS:
            group.rows.append(row)
        else:
            group.truncated += 1
    return [kept[k] for k in sorted(kept)], sum(counts.values())


def reward_keys(row: dict[str, Any], known: set[str]) -> list[str]:
    """The per-component reward columns of a rollout or prediction row (None = not applicable)."""
    return [k for k, v in row.items() if k not in known and (v is None or is_number(v))]


# ---------------------------------------------------------------- eval

@dataclass
class EvalTally:
    """What the report shows of a predictions.jsonl: a confusion tally and a few examples."""

    rows: int = 0
    counts: Counter = field(default_factory=Counter)  # (label, predicted label) -> n
    labels: Counter = field(default_factory=Counter)
    correct: list[dict[str, Any]] = field(default_factory=list)
    wrong: list[dict[str, Any]] = field(default_factory=list)


def read_predictions(path: str | Path, task: str, examples: int = 4) -> EvalTally:
    from visual_rft.tasks.classification import normalize_label
    from visual_rft.tasks.common import solution_answer

    tally = EvalTally()
    for row in iter_jsonl(path):
        tally.rows += 1
        if is_correct(row):
            if len(tally.correct) < examples:
                tally.correct.append(row)
        elif len(tally.wrong) < examples:
            tally.wrong.append(row)
        if task != "classification":
            continue
        label = row.get("label")
        label = normalize_label(str(label if label is not None else solution_answer(str(row.get("solution", "")))))
        pred = row.get("prediction")
        pred = (normalize_label(pred) or NO_ANSWER) if isinstance(pred, str) else NO_ANSWER
        key = (label, pred)
        if key not in tally.counts and len(tally.counts) >= MAX_CONFUSION_CELLS:
            key = (label, OTHER)  # hostile outputs could otherwise add one cell per row
        tally.counts[key] += 1
        tally.labels[label] += 1
    return tally


def is_correct(row: dict[str, Any]) -> bool:
    """Accuracy 1 for classification; otherwise the first non-format reward reaching 0.5."""
    if is_number(row.get("accuracy")):
        return row["accuracy"] >= 1.0
    for key in reward_keys(row, PREDICTION_KEYS):
        if key != "format" and is_number(row[key]):
            return row[key] >= 0.5
    return False


def confusion_matrix(tally: EvalTally, top: int = 20) -> tuple[list[str], list[str], list[list[int]]]:
    """(row labels, column labels, counts): the `top` most frequent true labels; predictions outside
    them go to OTHER, rows of rarer true labels to OTHER, missing answers to NO_ANSWER."""
    keep = [label for label, _ in tally.labels.most_common(top)]
    keep.sort()
    kept = set(keep)
    cells: Counter = Counter()
    for (label, pred), n in tally.counts.items():
        row = label if label in kept else OTHER
        col = pred if pred in kept or pred == NO_ANSWER else OTHER
        cells[(row, col)] += n
    rows = keep + ([OTHER] if any(r == OTHER for r, _ in cells) else [])
    cols = keep + [c for c in (OTHER, NO_ANSWER) if any(k == c for _, k in cells)]
    return rows, cols, [[cells[(r, c)] for c in cols] for r in rows]

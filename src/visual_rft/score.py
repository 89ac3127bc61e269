"""`visual-rft score`: add one numeric field per reward component to saved completions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visual_rft.data.rows import jsonl_rows
from visual_rft.rewards import resolve_rewards, task_module
from visual_rft.runlog import json_line


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """JSONL rows that each need `completion` and `solution`; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("completion", "solution"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: missing string field '{key}'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def score_rows(rows: list[dict[str, Any]], task: str, mode: str, thinking: str = "on") -> list[dict[str, Any]]:
    rewards = resolve_rewards(task, list(task_module(task).REWARDS), mode, thinking=thinking)
    keys = sorted({k for row in rows for k in row} - {"completion"})
    columns = {k: [row.get(k) for row in rows] for k in keys}
    scores = rewards.score([row["completion"] for row in rows], columns)
    return [{**row, **{name: scores[name][i] for name in rewards.names}} for i, row in enumerate(rows)]


def score_file(src: str | Path, dst: str | Path, task: str, mode: str, thinking: str = "on") -> dict[str, Any]:
    """Score `src` into `dst`; returns the mean of each component, and the settings scored under."""
    scored = score_rows(read_rows(src), task, mode, thinking)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as fh:
        fh.writelines(json_line(row) for row in scored)
    names = list(task_module(task).REWARDS)
    means = {name: sum(r[name] for r in scored) / len(scored) for name in names}
    return {**means, "settings": {"task": task, "mode": mode, "thinking": thinking}}

"""What the folders given to `visual-rft report` hold, told by the files in them: a training run
(metrics.jsonl, rollouts.jsonl, config.yaml), an eval output (predictions.jsonl, metrics.json), a
demo (results.json with base/, sft/, rft/ and eval/) or a data-efficiency sweep (results.jsonl,
table.json and sweep.png, written by `visual-rft sweep`). Nothing here reads more than a config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DEMO_PHASES = {"base": "base (supervised warm-up)", "sft": "SFT", "rft": "Visual-RFT (GRPO)"}
SWEEP_RESULTS = "results.jsonl"  # one line per finished sweep run; the sweep (sweep.py) appends to it


@dataclass
class Run:
    name: str
    path: Path
    kind: str  # "train" or "eval"
    task: dict[str, Any] = field(default_factory=dict)  # the config's `task` section, when known

    @property
    def anchor(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.kind}-{self.name}")


@dataclass
class Discovered:
    """The training and eval runs to show (demos expanded into their phases), the demo folders and
    the sweep folders."""

    runs: list[Run] = field(default_factory=list)
    demos: list[Path] = field(default_factory=list)
    sweeps: list[Path] = field(default_factory=list)


def config_text(path: Path) -> str | None:
    """config.yaml of the run, else that of its newest checkpoint."""
    candidates = [path / "config.yaml"]
    candidates += sorted(path.glob("checkpoint-*/config.yaml"),
                         key=lambda p: int(m.group(1)) if (m := re.search(r"(\d+)$", p.parent.name)) else -1,
                         reverse=True)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def _task_of(text: str | None) -> dict[str, Any]:
    import yaml

    try:
        task = (yaml.safe_load(text or "") or {}).get("task", {})
    except (yaml.YAMLError, AttributeError):
        return {}
    return task if isinstance(task, dict) else {}


def _entries(path: Path, name: str, task: dict[str, Any]) -> list[Run]:
    runs = []
    if (path / "metrics.jsonl").is_file() or (path / "rollouts.jsonl").is_file():
        runs.append(Run(name, path, "train", _task_of(config_text(path)) or task))
    if (path / "predictions.jsonl").is_file() or (path / "metrics.json").is_file():
        runs.append(Run(name, path, "eval", _task_of(config_text(path)) or task))  # eval writes its config
    return runs


def discover(run_dirs: Sequence[str | Path]) -> Discovered:
    found = Discovered()
    given = {Path(raw).resolve() for raw in run_dirs}
    for raw in run_dirs:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory")
        if (path / SWEEP_RESULTS).is_file():
            found.sweeps.append(path)  # its runs/ are not expanded: one sweep trains dozens of models
            continue
        if (path / "results.json").is_file():
            found.demos.append(path)
            task = _task_of(config_text(path / "rft"))
            runs = [r for phase in DEMO_PHASES for r in _entries(path / phase, phase, task)]
            runs += [r for phase in DEMO_PHASES for r in _entries(path / "eval" / phase, phase, task)]
        else:
            runs = _entries(path, path.name or str(path), {})
            inner = path / "eval"  # `visual-rft eval --out RUN/eval`: shown with its run
            if runs and inner.is_dir() and inner.resolve() not in given:
                runs += _entries(inner, f"{path.name}/eval", runs[0].task)
        if not runs:
            raise ValueError(f"{path}: not a run directory (no metrics.jsonl, rollouts.jsonl, predictions.jsonl, "
                             f"metrics.json, results.json or a sweep's {SWEEP_RESULTS})")
        found.runs += runs
    _dedupe_names(found.runs)
    return found


def _dedupe_names(runs: list[Run]) -> None:
    """Two runs called `run` (a/run, b/run) are shown as a/run and b/run."""
    for kind in ("train", "eval"):
        same = [r for r in runs if r.kind == kind]
        if len({r.name for r in same}) < len(same):
            for r in same:
                r.name = f"{r.path.parent.name}/{r.path.name}"

"""Run outputs as they happen: metrics JSONL, optional TensorBoard, sampled rollouts, phase timers."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class PhaseTimer:
    """Accumulates wall time per named phase (rollout, reward, reference, update, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return {f"time/{k}": round(v, 4) for k, v in out.items()}


class RunLog:
    """Appends one JSON object per line; a resumed run keeps appending to the same files."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = False, enabled: bool = True) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("output.tensorboard=true needs `pip install tensorboard`") from exc
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`: a run resumed from checkpoint `step` logs them again."""
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            path = self.dir / name
            if self.enabled and path.is_file():
                rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.dir / name, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def metrics(self, step: int, values: dict[str, Any], name: str = "metrics.jsonl") -> None:
        self._append(name, {"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._append("rollouts.jsonl", {"step": step, **row})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]

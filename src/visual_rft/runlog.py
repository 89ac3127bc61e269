"""Run outputs as they happen: metrics JSONL, sampled rollouts, phase timers, and the experiment
trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracker integration.

metrics.jsonl and rollouts.jsonl are always written; every tracker in `output.report_to` receives
the same numeric metrics at the same steps, and the sampled rollouts as a table where it has one
(a wandb.Table, an MLflow table artifact, a TensorBoard text table). Local trackers write under
the run directory: tensorboard/, wandb/ (WANDB_MODE=offline needs no network), mlruns/ (an MLflow
file store, unless MLFLOW_TRACKING_URI points elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from visual_rft.config import Config, ConfigError, OutputConfig, _suggest, to_dict
from visual_rft.runfolder import flat, heartbeat

# the package each tracker needs, and the extra that installs it
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                     "mlflow": ("mlflow", "mlflow")}


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


def tracker_names(output: OutputConfig) -> list[str]:
    """output.report_to, plus tensorboard for the older `output.tensorboard: true` (an alias)."""
    names = list(dict.fromkeys(output.report_to))
    if output.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_trackers(names: list[str]) -> None:
    """Each name is a tracker accelerate knows and its package is installed (accelerate itself would
    silently drop an unavailable one), else a ConfigError naming it."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"output.report_to: unknown tracker {name!r}" + _suggest(name, sorted(LOGGER_TYPE_TO_CLASS)))
        if name not in available:
            package, extra = _TRACKER_PACKAGES.get(name, (name, None))
            hint = f"pip install 'visual-rft[{extra}]'" if extra else f"pip install {package}"
            raise ConfigError(f"output.report_to: tracker {name!r} is not installed ({hint})")


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys with scalar values (what TensorBoard hparams and MLflow params take)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flat(to_dict(cfg)).items()}


def start_trackers(accelerator: Any, cfg: Config, out_dir: Path) -> None:
    """accelerator.init_trackers with the run's config, each local tracker writing under `out_dir`."""
    run_name = out_dir.resolve().name
    if "mlflow" in {str(t) for t in accelerator.log_with} and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow  # a file store in the run directory rather than mlflow's default in the cwd

        # mlflow 3 keeps its file store (no database packages, works offline) behind an opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        store = (out_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)  # else mlflow 3 opens a registry database in the cwd
    init_kwargs = {"wandb": {"dir": str(out_dir), "name": run_name}, "mlflow": {"run_name": run_name}}
    accelerator.init_trackers(cfg.output.project, config=flat_config(cfg), init_kwargs=init_kwargs)


class RunLog:
    """Appends one JSON object per line; a resumed run keeps appending to the same files.

    With an `accelerator` created with `log_with` (runtime.make_accelerator does this from
    output.report_to), the trackers are started here and receive every metrics row too."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, accelerator: Any = None,
                 cfg: Config | None = None) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.accelerator = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        if enabled and accelerator is not None and getattr(accelerator, "log_with", None):
            if cfg is None:
                raise ValueError("RunLog: trackers need the run's config")
            start_trackers(accelerator, cfg, self.dir)
            self.accelerator = accelerator

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`: a run resumed from checkpoint `step` logs them again."""
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            path = self.dir / name
            if self.enabled and path.is_file():
                rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                path.write_text("".join(json_line(r) for r in rows), encoding="utf-8")

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.dir / name, "a", encoding="utf-8") as fh:
                fh.write(json_line(row))

    def metrics(self, step: int, values: dict[str, Any], name: str = "metrics.jsonl") -> None:
        self._append(name, {"step": step, **values})
        if self.enabled:
            heartbeat(self.dir)  # the run folder's lock, for other hosts judging whether its writer lives
        if self.accelerator is not None:
            # rows of another file (e.g. eval metrics) keep their own namespace in the trackers
            prefix = "" if name == "metrics.jsonl" else f"{Path(name).stem}/"
            numbers = {f"{prefix}{k}": v for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(numbers, step=step)

    def rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._append("rollouts.jsonl", {"step": step, **row})
        if self.accelerator is not None and rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[_cell(row.get(c)) for c in columns] for row in rows]
            for tracker in self.accelerator.trackers:
                log_table(tracker, step, columns, data)

    def close(self) -> None:
        """Finish every tracker (flushes their files). Not accelerator.end_training, which would also
        tear down the process group that a caller may still use."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self.accelerator = None


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def log_table(tracker: Any, step: int, columns: list[str], data: list[list[Any]]) -> None:
    """Sampled completions as a table, in each tracker's own form (others get none)."""
    if tracker.name == "wandb":
        tracker.log_table("rollouts", columns=columns, data=data, step=step)
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_table({c: [row[i] for row in data] for i, c in enumerate(columns)},
                         artifact_file=f"rollouts/step_{step:06d}.json")
    elif tracker.name == "tensorboard":
        def cell(v: Any) -> str:
            return str(v).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
        tracker.writer.add_text("rollouts", "\n".join(lines), global_step=step)


def json_line(row: dict[str, Any]) -> str:
    """One JSONL line as every output writes it: non-ASCII text (completions, labels such as 玫瑰)
    stays text, not \\uXXXX escapes, so grep finds it; files are opened as UTF-8 to match."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def cpu_model() -> str:
    """The CPU's model name: float reductions, and so a warm-up's weights, differ between CPU models."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

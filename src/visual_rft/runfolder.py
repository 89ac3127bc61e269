"""A run folder you can trust: one writer at a time, no fresh run over an old one, and a resume that
continues the run the folder holds rather than another one under its name.

Standard library only: these checks run before torch is imported (see preflight.py), and under
torchrun / accelerate only the main process (RANK 0) takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

LOCK_NAME = ".visual-rft.lock"
CHANGES_NAME = "resume_changes.jsonl"
# A lock held from another host cannot be checked by pid; it counts as abandoned once its holder
# has not touched it (RunLog does at every logged step) for this long.
STALE_AFTER_S = 3600.0
# What a visual-rft run writes into its folder, and so what --overwrite removes (nothing else).
_RUN_FILES = ("metrics.jsonl", "rollouts.jsonl", "config.yaml", CHANGES_NAME)
_RUN_DIRS = ("checkpoint-", ".tmp-checkpoint-")

# Settings that do not change what a run computes: a resume may change them (they are recorded).
_HARMLESS_PREFIXES = ("output.", "eval.", "demo.", "sweep.")
_HARMLESS_KEYS = {"grpo.max_steps", "sft.max_steps", "grpo.fast", "model.gradient_checkpointing",
                  "grpo.optim.max_nonfinite_steps", "sft.optim.max_nonfinite_steps"}
# Settings a resume cannot apply, whatever the flag: the resumed policy is the checkpoint's model/
# (its adapters keep the rank, targets and base they were saved with), not model.name_or_path's.
_FIXED_PREFIXES = ("model.lora.",)
_FIXED_KEYS = {"model.name_or_path"}


class RunFolderError(ValueError):
    """A run folder that another process writes, that already holds a run, or a resume that would
    continue it with other settings; the message says what to do."""


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written, or torn: judged by its age alone


def _abandoned(holder: dict[str, Any], path: Path) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return True


class RunLock:
    """`with RunLock(folder, "train"):` — the folder's single writer, or RunFolderError naming the
    one that is. A lock whose holder died (same host: its pid is gone; other host: untouched for
    STALE_AFTER_S) is taken over. O_EXCL creation is atomic on local file systems and on NFSv3+."""

    def __init__(self, folder: str | Path, command: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover can race another one; the loser sees the winner's lock
            try:
                self._create()
            except FileExistsError:
                holder = _read_holder(self.path)
                if not _abandoned(holder, self.path):
                    raise RunFolderError(self._busy(holder)) from None
                self.path.unlink(missing_ok=True)
                continue
            self.held = True
            return
        raise RunFolderError(self._busy(_read_holder(self.path)))

    def _create(self) -> None:
        """The lock file, created whole: written under a private name, then hard-linked to the lock's
        name (atomic, and FileExistsError if it is taken), so no reader sees it empty. Where a file
        system has no hard links, O_EXCL creation then a write."""
        private = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
        private.write_text(json.dumps(self.me))
        try:
            os.link(private, self.path)
        except FileExistsError:
            raise
        except OSError:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
        finally:
            private.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and _read_holder(self.path).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _busy(self, holder: dict[str, Any]) -> str:
        who = (f"visual-rft {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
               f"since {holder.get('started', '?')})")
        return (f"{self.path.parent} is in use by {who}: wait for it to end or choose another output folder; "
                f"if that process is gone for good, delete {self.path}")


def heartbeat(folder: str | Path) -> None:
    """Show that the folder's writer is alive (read by other hosts' RunLock)."""
    try:
        os.utime(Path(folder) / LOCK_NAME)
    except OSError:
        pass  # not run from the command line (no lock), or the folder went away


@contextlib.contextmanager
def removed_if_left_empty(folder: str | Path) -> Iterator[None]:
    """A command that creates `folder` and then fails (a missing model, a hub id without network)
    leaves nothing behind: the folder is removed again if it was not there before and is still empty."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and is_main_process() and folder.is_dir() and not any(folder.iterdir()):
            with contextlib.suppress(OSError):  # another process wrote into it meanwhile: keep it
                folder.rmdir()
        raise


# ------------------------------------------------------------------------------- a fresh run
def run_artifacts(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name in _RUN_FILES or (p.is_dir() and p.name.startswith(_RUN_DIRS)))


def _held_run(folder: str | Path) -> list[Path]:
    """What shows that `folder` holds a training run (a config.yaml alone does not: eval writes one)."""
    return [p for p in run_artifacts(folder) if p.name != "config.yaml"]


def check_fresh_run(folder: str | Path, setting: str, *, overwrite: bool) -> None:
    """A run started without --resume must not append to another run's logs and leave its
    checkpoints for `predict RUN` to pick up: refuse, or with `overwrite` clear them first."""
    found = _held_run(folder)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunFolderError(f"{setting}={folder} already holds a run ({names}): pass --resume to continue it, "
                             f"choose another {setting}, or --overwrite to remove that run's checkpoints and logs "
                             "and start over there")
    for path in run_artifacts(folder):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


_EVAL_FILES = ("metrics.json", "predictions.jsonl")  # what an evaluation writes beside its config.yaml


def check_eval_out(folder: str | Path, setting: str, *, overwrite: bool = False) -> None:
    """eval writes config.yaml, metrics.json and predictions.jsonl: into a training run's own folder it
    would replace that run's config.yaml (what --resume and predict read), and over an earlier
    evaluation it would replace that one's results (only with `overwrite`)."""
    found = _held_run(folder)
    if found:
        raise RunFolderError(f"{setting}={folder} holds a training run ({found[0].name}, ...): eval would replace its "
                             f"config.yaml; write the evaluation next to it with --out {Path(folder) / 'eval'}")
    earlier = [name for name in _EVAL_FILES if (Path(folder) / name).is_file()]
    if earlier and not overwrite:
        raise RunFolderError(f"{setting}={folder} holds an earlier evaluation ({', '.join(earlier)}): choose another "
                             f"{setting}, or pass --overwrite to replace it")


# ------------------------------------------------------------------------------------ resume
def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (`grpo.optim.learning_rate`) with their leaf values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def harmless(key: str) -> bool:
    return key.startswith(_HARMLESS_PREFIXES) or key in _HARMLESS_KEYS


def config_changes(saved: dict[str, Any], requested: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, requested value) for every setting that differs, in key order."""
    a, b = flat(saved), flat(requested)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume(saved: dict[str, Any], requested: dict[str, Any], *, where: str, step: int,
                 accept_changes: bool, folder: str | Path) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose settings change what the run computes (unless `accept_changes`);
    record every change, harmless or accepted, in the folder's resume_changes.jsonl."""
    changes = config_changes(saved, requested)
    fixed = [c for c in changes if c[0].startswith(_FIXED_PREFIXES) or c[0] in _FIXED_KEYS]
    if fixed:
        lines = "\n".join(f"  {k}: {old!r} (in {where}) -> {new!r} (now)" for k, old, new in fixed)
        raise RunFolderError(f"--resume cannot apply these settings: the resumed policy is {where}/model, "
                             f"which keeps the model (and LoRA adapters) it was saved with:\n{lines}\nresume with "
                             f"the run's own values, or start a new run from it (model.name_or_path={folder}) in "
                             "another output.dir")
    computing = [c for c in changes if not harmless(c[0])]
    if computing and not accept_changes:
        lines = "\n".join(f"  {k}: {old!r} (in {where}) -> {new!r} (now)" for k, old, new in computing)
        raise RunFolderError(f"--resume: these settings differ from the run being resumed and change what it "
                             f"computes:\n{lines}\nresume with the run's own settings, start a new run in another "
                             f"output.dir, or pass --resume-with-changes to continue with the new ones (recorded "
                             f"in {CHANGES_NAME})")
    if changes and is_main_process():
        with open(Path(folder) / CHANGES_NAME, "a", encoding="utf-8") as fh:
            for key, old, new in changes:
                row = {"step": step, "key": key, "before": old, "after": new, "computing": not harmless(key)}
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return changes

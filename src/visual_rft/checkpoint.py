"""Checkpoints written atomically: a checkpoint directory either exists complete or not at all.

Layout of `checkpoint-N/`: `model/` (save_pretrained safetensors + processor, loadable like any
checkpoint), `optimizer.pt` (or, under DeepSpeed, `deepspeed/`: its sharded optimiser state, one file
per rank, written by engine.Engine.save), `scheduler.pt`, `rng.pt`, `config.yaml`, `trainer_state.json`.
State files are read back with `weights_only=True`, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from visual_rft.config import Config, save_config

# numpy and torch are imported where state is saved or restored, so finding a checkpoint
# (preflight's --resume check) stays free of the ~10 s torch import.

_NAME = re.compile(r"checkpoint-(\d+)$")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fault_point(where: str, step: int) -> None:
    """Fault injection for the kill-and-resume tests: VISUAL_RFT_FAULT=checkpoint:N kills this
    process with SIGKILL in the middle of writing checkpoint N (model written, state not yet)."""
    if os.environ.get("VISUAL_RFT_FAULT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def start_checkpoint(out_dir: str | Path, step: int, *, create: bool = True) -> Path:
    """The staging folder of checkpoint-`step` (emptied and made when `create`): other writers, such as
    DeepSpeed's ranks, put their part there before `save_checkpoint(..., staged=True)` completes it."""
    tmp = Path(out_dir) / f".tmp-checkpoint-{step}"
    if create:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a quota, a vanished mount): the message
    names the folder, what was being written and how much room a checkpoint needs."""


def save_checkpoint(out_dir: str | Path, step: int, *, model: Any, processor: Any, optimizer: Any,
                    scheduler: Any, cfg: Config, extra: dict[str, Any] | None = None,
                    keep: int = 2, staged: bool = False) -> Path:
    """Write checkpoint-`step` via a temporary directory and an atomic rename; prune old ones.
    `optimizer` None: its state is already in the staging folder (`staged`, see start_checkpoint).
    A failed write removes the temporary directory (earlier checkpoints are untouched) and raises
    CheckpointWriteError."""
    import torch

    from visual_rft.models.quiet import modes_like, save_model_dir  # here: finding a checkpoint must not import transformers

    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = start_checkpoint(out_dir, step, create=False)
    writing = "model/"
    try:
        if not staged:
            start_checkpoint(out_dir, step)
        save_model_dir(model, processor, tmp / "model")
        states = {"optimizer.pt": optimizer, "scheduler.pt": scheduler}
        for writing, state in states.items():
            if state is not None:
                torch.save(state.state_dict(), tmp / writing)
        writing = "rng.pt"
        torch.save(_rng_state(), tmp / writing)
        writing = "config.yaml"
        save_config(cfg, tmp / writing)
        _fault_point("checkpoint", step)
        writing = "trainer_state.json"
        (tmp / writing).write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        modes_like(tmp, tmp / "config.yaml")
        writing = "(fsync)"
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(write_failure(out_dir, final, writing, exc, model, optimizer)) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(out_dir, keep)
    return final


def room_error(out_dir: str | Path, step: int, model: Any) -> CheckpointWriteError | None:
    """The error of a checkpoint that will not fit (the last one's size, else the weights' size, against
    the free space), found before anything is written: for writers that must all agree to stop, such
    as DeepSpeed's ranks, whose save_checkpoint waits in collectives for a rank that failed alone."""
    out_dir = Path(out_dir)
    if shutil.disk_usage(out_dir).free >= checkpoint_bytes(out_dir, model, None):
        return None
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return CheckpointWriteError(write_failure(out_dir, out_dir / f"checkpoint-{step}", "(checked before writing)",
                                              full, model, None))


def checkpoint_bytes(out_dir: Path, model: Any, optimizer: Any) -> int:
    """What one checkpoint of this run takes: the last one's size, else its weights and optimiser state."""
    last = latest_checkpoint(out_dir)
    if last is not None:
        return sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    tensors = list(model.parameters())
    if optimizer is not None:
        tensors += [v for state in optimizer.state_dict()["state"].values() for v in state.values()
                    if hasattr(v, "element_size")]
    return sum(t.numel() * t.element_size() for t in tensors)


def write_failure(out_dir: Path, final: Path, writing: str, exc: BaseException, model: Any, optimizer: Any) -> str:
    needed, free = checkpoint_bytes(out_dir, model, optimizer), shutil.disk_usage(out_dir).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or free < needed
    reason = "no space left on the device" if full else (getattr(exc, "strerror", None) or str(exc).splitlines()[0])
    kept = latest_checkpoint(out_dir)
    return (f"cannot write {final.name} in {out_dir}: {reason} (while writing {writing}); a checkpoint of this run "
            f"takes about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free there. The partial checkpoint was "
            f"removed{f'; {kept.name} is intact' if kept else ''}. Free space or lower output.save_total_limit, "
            "then continue with --resume.")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    found = []
    for path in Path(out_dir).glob("checkpoint-*"):
        match = _NAME.search(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_training_state(ckpt: str | Path, *, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore optimiser, scheduler and RNG from `ckpt`; returns trainer_state.json."""
    import torch

    ckpt = Path(ckpt)
    if optimizer is not None:  # None: restored by its engine (DeepSpeed's sharded state)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())

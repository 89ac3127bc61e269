"""Stopping on SIGTERM / SIGINT without losing work: what Slurm and Kubernetes send before a kill.

The first signal asks the training loop to stop after the step in flight: it writes a checkpoint of
that step and exits with 128 + the signal's number, saying how to resume. A second signal exits at
once (the default action), for when the first one's grace period is not wanted.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by the training loop once it has saved the step in flight after a stop signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}: {checkpoint} written; continue the run with the "
                         "same command and --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """`with StopSignals() as stop:` — `stop.signum` becomes the first SIGTERM / SIGINT received
    (0 until then); the previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # the second signal: stop now, as if no handler had been installed
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

"""transformers' own progress bars, off where they would break ours or clutter a command's output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar per save (a checkpoint, a tiny model)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()

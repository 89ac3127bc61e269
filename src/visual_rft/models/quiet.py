"""transformers' own progress bars, off where they would break ours or clutter a command's output, and
model directories saved without them, readable like every other file a command writes."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def name_deepspeeds_cpu_accelerator() -> None:
    """Where DeepSpeed is installed, transformers and accelerate import it in every command, and on a
    machine without CUDA it warns "Setting accelerator to CPU. If you have GPU or other accelerator,
    we were unable to detect it." (read as trouble; on stdout in some versions, where commands print
    JSON). Naming its CPU accelerator before that import keeps it quiet; a user's choice stands."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


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


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around wrapping a model with peft: PeftModel's constructor asks transformers >= 5.24 for
    `is_gradient_checkpointing`, which warns "is deprecated ... Use is_activation_checkpointing" on
    every LoRA command: peft's call, nothing a user can change. That one warning only is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def save_model_dir(model: Any, processor: Any, directory: Path) -> None:
    """A save_pretrained directory (weights and processor) as checkpoints, exports and tiny models
    write it: without the "Writing model shards" bar, every file with its (adapter_)config.json's mode."""
    with library_bars_off():
        model.save_pretrained(directory, safe_serialization=True)
        processor.save_pretrained(directory)
    configs = [Path(directory) / name for name in ("config.json", "adapter_config.json")]  # LoRA: adapters only
    template = next((path for path in configs if path.is_file()), None)
    if template is not None:  # a model that writes neither (a test's stand-in) keeps its files' modes
        modes_like(directory, template)


def modes_like(root: Path, template: Path) -> None:
    """Give every file under `root` the mode of `template`, a file a plain open() wrote (0644 under
    the usual umask): the weights writer creates model.safetensors 0600, so the rest of a team could
    read everything but the weights. Read off a file rather than os.umask(), which would set the
    umask to 0 for every thread of the process while it is read."""
    mode = Path(template).stat().st_mode & 0o777
    for path in Path(root).rglob("*"):
        if path.is_file():
            path.chmod(mode)

"""Checks that run before any model loads, and before torch or transformers are imported (~10-20 s
on a busy CPU): the output directory can be written, the data paths exist, `--resume` has a
checkpoint to resume. Each error names the setting that holds the bad value, so it can be fixed
without reading a traceback.

Only the standard library and the light parts of the package are imported here."""

from __future__ import annotations

import tempfile
from pathlib import Path

from visual_rft.config import Config


class OutputDirError(ValueError):
    """An output directory that cannot be created or written, with the setting that names it."""


class ResumeError(ValueError):
    """`--resume` with no complete checkpoint to resume from."""


def check_output_dir(path: str | Path, setting: str) -> Path:
    """Create `path` if needed and prove it writable with a probe file; the error names `setting`."""
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{setting}={path}: {existing} is a file, not a directory; choose another {setting}")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputDirError(f"{setting}={path}: cannot write there ({reason}); choose another {setting}") from exc
    return target


def data_path_of(spec: str) -> Path | None:
    """The file or directory a data spec reads (None for embedded data), as load_records parses it."""
    if spec.startswith("embedded:"):
        return None
    if spec.startswith(("coco:", "lvis:", "lisa:")):
        return Path(spec.split(":", 1)[1].split("?", 1)[0])
    return Path(spec.rsplit("::", 1)[0] if "::" in spec else spec)


def check_data_paths(cfg: Config, splits: tuple[str, ...], required: str = "train") -> None:
    """Each of data.<split> names something that exists; the split the command reads (`eval` for
    eval, else `train`) must be set, the others only where given."""
    for split in splits:
        spec = getattr(cfg.data, split)
        if not spec:
            if split == ("eval" if required == "eval" else "train"):
                raise ValueError(f"data.{split} is not set: give a dataset path (e.g. data.{split}=path/to/data.jsonl)")
            continue
        path = data_path_of(str(spec))
        if path is not None and not path.exists():
            raise FileNotFoundError(f"data.{split}={spec}: no such file or directory ({path})")


def find_resume_checkpoint(out_dir: str | Path, *, required: bool) -> Path | None:
    """The newest complete checkpoint in `out_dir`. None (said aloud) when there is none and it is not
    `required` (--resume-if-present); with `required` (--resume) that is an error, since silently
    starting over would overwrite the run the user meant to continue."""
    from visual_rft.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out_dir)
    if ckpt is None and required:
        raise ResumeError(f"--resume: no complete checkpoint in output.dir={out_dir}; check output.dir, or pass "
                          "--resume-if-present to start from scratch when there is none")
    if ckpt is None:
        print(f"--resume-if-present: no checkpoint in {out_dir}, starting from scratch")
    return ckpt


def preflight(cfg: Config, command: str, out_dir: str | Path | None = None, out_setting: str = "output.dir") -> None:
    """Everything `train` / `sft` / `eval` can check before importing torch and loading a model."""
    # train / sft read data.eval too, unless eval.steps=-1 switches evaluation during training off
    splits = ("eval",) if command == "eval" else ("train", "eval") if cfg.eval.steps >= 0 else ("train",)
    check_data_paths(cfg, splits, required=command)
    check_output_dir(out_dir if out_dir is not None else cfg.output.dir, out_setting)

"""What `predict`, `export` and `eval --model` accept as a model: a run directory (its latest complete checkpoint),
a checkpoint-N directory, a checkpoint's model/ directory (full weights or LoRA adapters), any
save_pretrained directory, or a hub id; and the config to load it with (the run's own when there
is one, so prompts, image sizes and rewards are the training ones)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visual_rft.checkpoint import latest_checkpoint
from visual_rft.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # train / sft resolve their model before torch is imported (preflight.py)
    import torch

# the run config an exported model directory carries (export.py), so prompts stay the training ones
CONFIG_NAME = "visual_rft_config.yaml"


@dataclass
class ModelSource:
    """`model` is what runtime.load_policy loads (a directory or a hub id); `config` is the run's
    saved config.yaml when the model is a checkpoint of a run."""

    model: str
    config: Path | None = None
    run: Path | None = None  # the run directory (its metrics, its eval results)
    step: int | None = None
    adapters: bool = False  # a LoRA checkpoint: adapters over the run's model.name_or_path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _from_checkpoint(ckpt: Path) -> ModelSource:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    model = ckpt / "model"
    if not _is_model_dir(model):
        raise FileNotFoundError(f"checkpoint {ckpt} has no model/ with config.json or adapter_config.json")
    config = ckpt / "config.yaml"
    return ModelSource(str(model), config if config.is_file() else None, ckpt.parent, state.get("step"),
                       (model / "adapter_config.json").is_file())


def resolve_model_source(spec: str | Path) -> ModelSource:
    """Which of the accepted forms `spec` is; a path that is none of them is an error naming what
    was looked for, and a string that is no path is left to the loader as a hub id."""
    path = Path(spec).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file; expected a model, checkpoint or run directory")
    if not path.is_dir():
        return ModelSource(str(spec))
    if (path / "trainer_state.json").is_file():
        return _from_checkpoint(path)
    if _is_model_dir(path):
        if (path.parent / "trainer_state.json").is_file():
            return _from_checkpoint(path.parent)
        config = path / CONFIG_NAME
        return ModelSource(str(path), config if config.is_file() else None,
                           adapters=(path / "adapter_config.json").is_file())
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return _from_checkpoint(ckpt)
    if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"run directory {path} has no complete checkpoint (checkpoint-N/ with trainer_state.json)")
    raise FileNotFoundError(
        f"{path} is not a model directory (no config.json or adapter_config.json), a checkpoint "
        "(no trainer_state.json) or a run directory (no checkpoint-N/)")


def training_model(spec: str) -> str:
    """model.name_or_path of `train` / `sft` as the other commands read a model: a run folder is its
    latest checkpoint's model/, a checkpoint-N its model/ (GRPO from an SFT run is the usual second
    step). LoRA adapters are no whole model to start from: export merges them over their base."""
    source = resolve_model_source(spec)
    if source.adapters:
        raise ConfigError(f"model.name_or_path={spec}: {source.model} holds LoRA adapters, not a whole model; merge "
                          f"them over their base first (visual-rft export {spec} DIR) and train from "
                          "model.name_or_path=DIR")
    return source.model


def adapter_base(source: ModelSource) -> str:
    """The base model LoRA adapters were trained on: the run's model.name_or_path when the checkpoint
    belongs to a run, else the one recorded in adapter_config.json."""
    if source.config is not None:
        return load_config(source.config).model.name_or_path
    recorded = json.loads((Path(source.model) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise FileNotFoundError(f"LoRA adapters {source.model}: adapter_config.json names no base_model_name_or_path; "
                                "give model.name_or_path=DIR")
    return str(recorded)


def source_config(source: ModelSource, config_path: str | Path | None = None,
                  overrides: list[str] | None = None) -> Config:
    """The run's config, an export's carried config, or `config_path`; then `overrides`. A bare
    adapter directory's base is the one recorded in its adapter_config.json."""
    base: list[str] = []
    if source.config is None and source.adapters:
        base = [f"model.name_or_path={adapter_base(source)}", "model.lora.enabled=true"]
    elif source.run is None:  # a model directory (an export's config names itself) or a hub id
        base = [f"model.name_or_path={source.model}"]
    return load_config(config_path or source.config, [*base, *(overrides or [])])


def load_source(source: ModelSource, cfg: Config, device: torch.device) -> tuple[Any, Any]:
    """The policy (eval mode) and processor, through the same loader as training."""
    from visual_rft.runtime import load_policy

    try:
        model, processor = load_policy(cfg, device, source.model)
    except (OSError, ValueError) as exc:
        if not source.adapters:
            raise
        raise FileNotFoundError(f"LoRA checkpoint {source.model}: cannot load its base model "
                                f"{cfg.model.name_or_path!r} (the run's model.name_or_path): {exc}; "
                                "give model.name_or_path=DIR") from exc
    return model.eval(), processor

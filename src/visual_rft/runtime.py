"""What every command sets up the same way: records, the policy and its processor (devices and engines: engine.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visual_rft.config import Config, ConfigError
from visual_rft.data.check import check_records, checked
from visual_rft.data.record import DEFAULT_MAX_IMAGE_PIXELS, Record
from visual_rft.data.sources import load_records
from visual_rft.models.families import default_box_space
from visual_rft.models.loading import build_model_inputs, load_model_and_processor, load_model_config
from visual_rft.models.quiet import peft_wrapping
from visual_rft.tasks.prompts import build_prompt


def load_split(cfg: Config, which: str = "train") -> list[Record]:
    path = cfg.data.train if which == "train" else cfg.data.eval
    if not path:
        raise ValueError(f"data.{which} is not set: give a dataset path (e.g. data.{which}=path/to/data.jsonl)")
    boxes = cfg.task.name != "classification" or cfg.tools.enabled  # tool calls take boxes in the run's space
    records = load_records(path, task=cfg.task.name, image_root=cfg.data.image_root, limit=cfg.data.limit,
                           box_space=resolve_box_space(cfg) if boxes else None)
    if not records:
        raise ValueError(f"data.{which} ({path}) has no records")
    _check_pixel_boxes(records, cfg.data.image_size, f"data.{which} ({path})")
    if cfg.data.check:
        records = checked(records, cfg.task.name, cfg.data.on_bad_record, f"data.{which} ({path})",
                          max_pixels=cfg.data.max_image_pixels, tools=trajectory_check(cfg))
    return records


def trajectory_check(cfg: Config) -> Any:
    """With tools.enabled, how the data check validates each record's `tool_calls` (tools/trajectory.py):
    against the configured tools, in the run's box space, on images sized as data.image_size says.
    Box arguments refer to the image's own pixels here (a processor's resize is not applied)."""
    if not cfg.tools.enabled:
        return None
    from visual_rft.tools.registry import ToolSettings, select_tools
    from visual_rft.tools.trajectory import TrajectoryCheck

    tools = select_tools(cfg.tools.names)
    takes_boxes = any(p.kind == "box" for spec in tools.values() for p in spec.params)
    space = resolve_box_space(cfg) if takes_boxes or cfg.task.box_space != "auto" else "qwen2vl"
    settings = ToolSettings(box_space=space, zoom_pixels=cfg.tools.zoom_pixels)
    return TrajectoryCheck(tools, settings, cfg.tools.think, cfg.task.thinking, cfg.tools.max_turns,
                           cfg.data.image_size)


def resolve_box_space(cfg: Config) -> str:
    """task.box_space, with `auto` resolved from the model family (families.default_box_space)."""
    if cfg.task.box_space != "auto":
        return cfg.task.box_space
    try:
        model_type = load_model_config(cfg.model.name_or_path).model_type
    except OSError as exc:  # FileNotFoundError included: e.g. a model built after the data is loaded
        raise ConfigError(f"task.box_space: auto takes the model family's box space, but model.name_or_path "
                          f"({cfg.model.name_or_path}) cannot be read ({exc}); set task.box_space "
                          "(qwen2vl, pixels or normalized) to what the task's question asks for") from exc
    return default_box_space(model_type)


def _check_pixel_boxes(records: list[Record], size: int | None, where: str) -> None:
    """Boxes in absolute pixels are tied to one frame; a square resize (data.image_size) moves them.
    Relative spaces (qwen2vl 0-1000, normalized) survive any resize, so only `pixels` is checked."""
    if not size:
        return
    for record in records:
        frame = record.fields.get("image_size")
        if record.fields.get("box_space") == "pixels" and frame and tuple(frame) != (size, size):
            raise ConfigError(
                f"{where} {record.source}: boxes are in 'pixels' of a {frame[0]}x{frame[1]} frame, but "
                f"data.image_size={size} resizes every image to {size}x{size}, which would misplace them; "
                "use box_space=qwen2vl or normalized (relative), or leave data.image_size unset")


def check_data(cfg: Config) -> dict[str, Any]:
    """`visual-rft data check`: every configured split, checked in full (the policy is not applied)."""
    out: dict[str, Any] = {}
    tools = trajectory_check(cfg)
    for which in ("train", "eval"):
        path = getattr(cfg.data, which)
        if not path:
            continue
        records = load_records(path, task=cfg.task.name, image_root=cfg.data.image_root, limit=cfg.data.limit,
                               box_space=tools.settings.box_space if tools else None)
        report = check_records(records, cfg.task.name, max_pixels=cfg.data.max_image_pixels, tools=tools)
        out[which] = {"path": path, "records": report.total, "bad": report.bad, "image_modes": report.modes,
                      "problems": [f"{source}: {reason}" for source, reason in report.problems]}
    if not out:
        raise ValueError("nothing to check: set data.train and/or data.eval")
    return out


def load_policy(cfg: Config, device: torch.device, path: str | Path | None = None,
                dtype: str | None = None) -> tuple[Any, Any]:
    """The policy and processor from `path` (default: model.name_or_path), placed and configured, in
    `dtype` (default: model.dtype; the training engine may decide otherwise: engine.Engine.load_dtype).

    A LoRA checkpoint (`path` holds adapter_config.json, no weights of its own) is model.name_or_path
    (its base: weights and processor) with the saved adapters on top, trainable."""
    m = cfg.model
    lora = None
    if m.lora.enabled:
        lora = {"r": m.lora.r, "alpha": m.lora.alpha, "dropout": m.lora.dropout, "target_modules": m.lora.target_modules}
    adapters = path is not None and (Path(path) / "adapter_config.json").is_file()
    model, processor = load_model_and_processor(
        m.name_or_path if adapters else str(path or m.name_or_path), dtype=dtype or m.dtype, device=str(device),
        attn_implementation=m.attn_implementation, freeze_vision=m.freeze_vision, lora=None if adapters else lora,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    if adapters:
        from peft import PeftModel

        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    image_processor = getattr(processor, "image_processor", None)
    for key in ("min_pixels", "max_pixels"):
        value = getattr(m, key)
        if value is not None and image_processor is not None:
            setattr(image_processor, key, value)
            if isinstance(getattr(image_processor, "size", None), dict):
                image_processor.size[{"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}[key]] = value
    return model, processor


def record_images(record: Record, size: int | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """The record's images in prompt order, each resized to size x size when data.image_size is set."""
    return [image.resize((size, size), Image.BILINEAR) if size and image.size != (size, size) else image
            for image in record.load_images(max_pixels)]


def prompt_parts(records: list[Record], cfg: Config) -> tuple[list[list[Image.Image]], list[str]]:
    """Each record's images (decoded and sized as data.* says) and its question text."""
    return ([record_images(record, cfg.data.image_size, cfg.data.max_image_pixels) for record in records],
            [build_prompt(record, cfg.task) for record in records])


def check_prompt_length(inputs: dict[str, torch.Tensor], max_prompt_length: int | None, records: list[Record],
                        what: str = "prompt") -> None:
    """Stop on a (left-padded) batch of prompts longer than grpo.max_prompt_length, naming its records."""
    length = inputs["input_ids"].size(1)
    if max_prompt_length and length > max_prompt_length:
        sources = ", ".join(r.source for r in records)
        raise ValueError(
            f"{what} of {length} tokens exceeds grpo.max_prompt_length={max_prompt_length} ({sources}); "
            "raise the limit or lower model.max_pixels — cutting a prompt would cut its image tokens"
        )


def prompt_batch(records: list[Record], cfg: Config, processor: Any, device: torch.device,
                 max_prompt_length: int | None = None, parts: tuple[list[list[Image.Image]], list[str]] | None = None
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Model inputs for `records`, one prompt each (GRPO reuses a prompt's prefill for its group);
    `parts`: prompt_parts(records, cfg) where the caller already has them (decoded once)."""
    images, prompts = parts if parts is not None else prompt_parts(records, cfg)
    inputs = build_model_inputs(processor, images, prompts, system=cfg.task.system_prompt)
    check_prompt_length(inputs, max_prompt_length, records)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, prompts

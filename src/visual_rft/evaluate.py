"""Run a model over a split and score it with the task's own reward functions (the verifier the
policy trained on), writing predictions.jsonl and metrics.json."""

from __future__ import annotations

import copy
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from visual_rft.config import Config, save_config
from visual_rft.data.record import Record, columns_of
from visual_rft.engine import make_accelerator
from visual_rft.model_source import adapter_base, resolve_model_source
from visual_rft.models.loading import vision_token_ids
from visual_rft.rewards import task_module, task_rewards
from visual_rft.rl.rollout import generate
from visual_rft.runlog import json_line
from visual_rft.runtime import load_policy, load_split, prompt_batch


def predict(model: Any, processor: Any, records: list[Record], cfg: Config, device: torch.device,
            progress: bool = True, on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
            image_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One completion per record, scored by every reward of the task and parsed by its parser;
    `on_rows` receives each batch's rows as soon as they exist (eval writes them as it goes).
    With tools.enabled each record is a tool conversation (tool_eval.py): the final turn is the
    completion, every turn is kept, and with `image_dir` the tools' images are written there."""
    rewards = task_rewards(cfg.task, list(task_module(cfg.task.name).REWARDS), tools=cfg.tools)
    suppress = vision_token_ids(processor, getattr(model, "config", None))
    if cfg.tools.enabled:
        from visual_rft import tool_eval

        runner = tool_eval.ToolRunner.from_config(cfg, processor)
        draw = tool_eval.eval_draw(model, processor, cfg, suppress)
    rows: list[dict[str, Any]] = []
    model.eval()
    batches = range(0, len(records), cfg.eval.batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress):
        batch = records[start:start + cfg.eval.batch_size]
        if cfg.tools.enabled:
            conversations = tool_eval.converse(model, processor, batch, cfg, device, draw, runner=runner)
            rows += tool_eval.conversation_rows(conversations, batch, rewards, first_row=start,
                                                image_dir=Path(image_dir) if image_dir is not None else None)
        else:
            rows += _one_turn_rows(model, processor, batch, cfg, device, rewards, suppress)
        if on_rows is not None:
            on_rows(rows[start:])
    return rows


def _one_turn_rows(model: Any, processor: Any, batch: list[Record], cfg: Config, device: torch.device,
                   rewards: Any, suppress: list[int]) -> list[dict[str, Any]]:
    inputs, _ = prompt_batch(batch, cfg, processor, device)
    _, mask, texts = generate(model, processor.tokenizer, inputs, max_new_tokens=cfg.eval.max_new_tokens,
                              temperature=cfg.eval.temperature, suppress_ids=suppress)
    scores = rewards.score(texts, columns_of(batch))
    rows = []
    for i, (record, text) in enumerate(zip(batch, texts)):
        parsed = rewards.parse(text, **record.columns())  # the parser the rewards' mode binds
        rows.append({"source": record.source, "solution": record.solution, "completion": text,
                     "prediction": _jsonable(parsed), "parse_failed": parsed is None,
                     "label": record.fields.get("label"), "completion_tokens": int(mask[i].sum()),
                     **{name: scores[name][i] for name in rewards.names}})
    return rows


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def summarize(rows: list[dict[str, Any]], reward_names: list[str]) -> dict[str, Any]:
    """Mean of every reward component, parse-failure rate and, with labels, per-class accuracy."""
    n = len(rows)
    metrics: dict[str, Any] = {"num_samples": n}
    for name in reward_names:
        metrics[name] = sum(r[name] for r in rows) / n
    if "format" in metrics:
        metrics["format_rate"] = metrics.pop("format")
    metrics["parse_failure_rate"] = sum(r["parse_failed"] for r in rows) / n
    metrics["mean_completion_tokens"] = sum(r["completion_tokens"] for r in rows) / n
    if "accuracy" in reward_names and any(r.get("label") is not None for r in rows):
        per_class: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            per_class[str(r["label"])].append(r["accuracy"])
        metrics["per_class_accuracy"] = {k: sum(v) / len(v) for k, v in sorted(per_class.items())}
    return metrics


def task_metrics(rows: list[dict[str, Any]], records: list[Record], cfg: Config) -> dict[str, Any]:
    """Box metrics: COCO mAP / AP50 / AP75 / per-category (+ LVIS and open-vocabulary groups) for
    detection, mIoU / gIoU / cIoU for grounding; nothing extra for classification."""
    if cfg.task.name == "detection":
        from visual_rft.det_eval import detection_metrics, has_detection_fields
        return detection_metrics(rows, records, mode=cfg.task.mode) if has_detection_fields(records) else {}
    if cfg.task.name == "grounding":
        from visual_rft.det_eval import grounding_metrics
        return grounding_metrics(rows, records, mode=cfg.task.mode)
    return {}


def evaluate_model(model: Any, processor: Any, records: list[Record], cfg: Config, device: torch.device,
                   out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of `model` on `records`; with `out_dir`, predictions.jsonl is written batch by batch
    (a crash midway keeps what was predicted), then metrics.json, and config.yaml (the report
    finds the records' images through its data settings). With tools.enabled the tools' images go to
    out_dir/tool_images/ and metrics.json gains the tool/* metrics (tool_eval.tool_metrics)."""
    if out_dir is None:
        rows = predict(model, processor, records, cfg, device, progress)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
            def write(batch: list[dict[str, Any]]) -> None:
                fh.writelines(json_line(r) for r in batch)
                fh.flush()

            if cfg.tools.enabled:  # the images of an earlier evaluation (--overwrite) are not this one's
                shutil.rmtree(out / "tool_images", ignore_errors=True)
            rows = predict(model, processor, records, cfg, device, progress, on_rows=write, image_dir=out)
    names = list(task_module(cfg.task.name).REWARDS)
    metrics = summarize(rows, names)
    metrics.update(task_metrics(rows, records, cfg))
    if cfg.tools.enabled:
        from visual_rft.tool_eval import headline_reward, tool_metrics

        metrics.update(tool_metrics(rows, headline_reward(names)))
    metrics["thinking"] = cfg.task.thinking  # which format the format_rate holds completions to
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_eval(cfg: Config, model_path: str | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """`visual-rft eval`: model.name_or_path (or `model_path`: a run, checkpoint, LoRA checkpoint,
    export or hub id, resolved as predict and export resolve it) over data.eval. LoRA adapters load
    over the base they were trained on (model_source.adapter_base), not the config's model."""
    source = resolve_model_source(model_path) if model_path else None
    if source is not None:  # the model's own directory: task.box_space=auto reads its family from there
        cfg = copy.deepcopy(cfg)
        if source.adapters:
            cfg.model.name_or_path, cfg.model.lora.enabled = adapter_base(source), True
        else:
            cfg.model.name_or_path = str(source.model)
    records = load_split(cfg, "eval")
    accelerator = make_accelerator(cfg)
    model, processor = load_policy(cfg, accelerator.device, source.model if source else None)
    return evaluate_model(model, processor, records, cfg, accelerator.device, out_dir or cfg.output.dir,
                          progress=cfg.output.progress)


class TrainingEval:
    """Evaluation on data.eval while `train` / `sft` run: every `eval.steps` optimiser steps and at
    the last step, through `evaluate_model` (the verifier `visual-rft eval` uses), logged as
    `eval/<metric>` in the step's metrics.jsonl row (or a row of its own when output.log_steps
    skips that step). Every process evaluates all records greedily (identical work, so sharded
    models stay in step); the RNG is forked so training draws the same random numbers as without it."""

    def __init__(self, cfg: Config, records: list[Record]) -> None:
        self.cfg, self.records = cfg, records

    @classmethod
    def from_config(cls, cfg: Config) -> "TrainingEval | None":
        """None without data.eval or with eval.steps=-1; the split is loaded and checked now, before
        any model loads, so a bad eval split fails early."""
        if not cfg.data.eval or cfg.eval.steps < 0:
            return None
        return cls(cfg, load_split(cfg, "eval"))

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.eval.steps
        return step == total or (every > 0 and step % every == 0)

    def maybe_run(self, step: int, total: int, accelerator: Any, model: Any, processor: Any,
                  log: Any) -> dict[str, float]:
        """The eval/* metrics to merge into the step's row ({} when not due or logged here)."""
        if not self.due(step, total):
            return {}
        from visual_rft.engine import full_weights_for_generation

        devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), full_weights_for_generation(accelerator, model) as policy:
            was_training = policy.training
            metrics = evaluate_model(policy, processor, self.records, self.cfg, accelerator.device, progress=False)
            policy.train(was_training)
        scalars = {f"eval/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        every_log = max(self.cfg.output.log_steps, 1)
        if step % every_log != 0 and step != total:  # the step's own row will not be written
            log.metrics(step, scalars)
            return {}
        return scalars

"""`visual-rft export`: a run or checkpoint as a plain Hugging Face model directory.

LoRA adapters are merged into the weights; the processor (with its chat template) is saved beside
them, so `AutoModelForImageTextToText.from_pretrained(OUT)` and `visual-rft eval --model OUT` load
it with no adapter or run files. A README.md model card records the base model, the training
config, the data and whatever metrics the run has. Everything is written into a temporary sibling
directory that is renamed to OUT at the end: a failure leaves no OUT, and OUT is never overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from visual_rft.config import Config, save_config, to_dict
from visual_rft.model_source import CONFIG_NAME, ModelSource, load_source, resolve_model_source, source_config
from visual_rft.runlog import read_jsonl
from visual_rft.engine import make_accelerator
from visual_rft.models.quiet import save_model_dir

_GRPO_KEYS = ("num_generations", "per_device_batch_size", "grad_accum_steps", "learning_rate", "beta", "epsilon",
              "temperature", "max_completion_length", "loss_type", "seed")
_SFT_KEYS = ("batch_size", "grad_accum_steps", "learning_rate", "max_steps", "seed")


def export_model(spec: str, out: str | Path, *, config: str | None = None, overrides: list[str] | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; export writes a new directory and never overwrites one")
    source = resolve_model_source(spec)
    extra = [f"model.dtype={dtype}"] if dtype else []
    cfg = source_config(source, config, [*(overrides or []), *extra])
    trained = copy.deepcopy(cfg)  # the card shows the config as the run had it
    cfg.output.report_to, cfg.output.tensorboard = [], False
    cfg.model.gradient_checkpointing = False  # a training setting; it must not travel into the export
    model, processor = load_source(source, cfg, make_accelerator(cfg).device)
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model_dir(model, processor, tmp)
        (tmp / "README.md").write_text(model_card(source, trained, merged, out.name))
        save_config(exported_config(cfg, out), tmp / CONFIG_NAME)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(out), "source": source.model, "step": source.step, "lora_merged": merged,
            "base_model": cfg.model.name_or_path if source.run or source.adapters else None,
            "files": sorted(p.name for p in out.iterdir())}


def exported_config(cfg: Config, out: Path) -> Config:
    """The run's config as it applies to the export (what `predict OUT` and `eval` read back): the
    model is OUT itself, with any LoRA already merged."""
    exported = copy.deepcopy(cfg)
    exported.model.name_or_path = str(out)
    exported.model.lora.enabled = False
    return exported


# ---------------------------------------------------------------- the model card

def run_metrics(run: Path | None) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The run's training metrics rows and every eval metrics.json in it or one level down."""
    if run is None:
        return [], {}
    rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    evals = {}
    for path in sorted([*run.glob("metrics.json"), *run.glob("*/metrics.json")]):
        try:
            evals[str(path.relative_to(run))] = json.loads(path.read_text())
        except ValueError:
            continue  # a broken metrics file is left out of the card, not a failed export
    return rows, evals


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _training_section(cfg: Config, source: ModelSource, rows: list[dict[str, Any]], merged: bool) -> list[str]:
    grpo = any("reward/total_mean" in r for r in rows) or (source.run is not None and (source.run / "rollouts.jsonl").is_file())
    method = "GRPO (Visual-RFT)" if grpo else "supervised fine-tuning" if rows else "not recorded"
    section = cfg.grpo if grpo else cfg.sft
    settings = {**to_dict(section), **to_dict(section.optim)}  # learning_rate lives in the optim block
    keys = _GRPO_KEYS if grpo else _SFT_KEYS
    lines = ["## Training", "", f"- method: {method}",
             f"- step: {source.step if source.step is not None else 'not recorded'}",
             f"- task: `{cfg.task.name}` (reward mode `{cfg.task.mode}`, thinking {cfg.task.thinking}, rewards "
             f"{', '.join(cfg.task.rewards)})",
             f"- training data: `{cfg.data.train or 'not recorded'}`; eval data: `{cfg.data.eval or 'none'}`",
             "- " + ", ".join(f"{k} {settings[k]}" for k in keys)]
    if merged:
        lora = cfg.model.lora
        lines.append(f"- LoRA (r {lora.r}, alpha {lora.alpha}) merged into the weights")
    if rows:
        first, last = _scalars(rows[0]), _scalars(rows[-1])
        shown = [k for k in ("reward/total_mean", *[k for k in last if k.startswith("reward/") and k.endswith("_mean")],
                             "loss", "parse_failure_rate") if k in last and k in first]
        lines += ["", f"Training metrics (metrics.jsonl, step {first['step']} -> step {last['step']}):", "",
                  "| metric | first | last |", "|---|---|---|"]
        lines += [f"| {k} | {first[k]:.4g} | {last[k]:.4g} |" for k in dict.fromkeys(shown)]
    return lines


def _eval_section(evals: dict[str, dict[str, Any]]) -> list[str]:
    if not evals:
        return ["## Evaluation", "", "The run directory holds no eval results (`visual-rft eval` writes metrics.json)."]
    lines = ["## Evaluation", ""]
    for where, metrics in evals.items():
        lines += [f"`{where}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in _scalars(metrics).items()]
        lines.append("")
    return lines[:-1]


def model_card(source: ModelSource, cfg: Config, merged: bool, name: str) -> str:
    """README.md: front matter for the hub, then base model, training, metrics, usage, full config."""
    base = cfg.model.name_or_path if source.run or source.adapters else None
    rows, evals = run_metrics(source.run)
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
             "tags": ["visual-rft", "grpo", cfg.task.name]}
    if base:
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"Exported by `visual-rft export` from `{source.model}`"
             + (f" (run `{source.run}`)." if source.run else "."), "",
             f"- base model: `{base}`" if base else "- base model: not recorded (not a visual-rft run)", ""]
    lines += _training_section(cfg, source, rows, merged) + [""] + _eval_section(evals) + [""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor",
              f'model = AutoModelForImageTextToText.from_pretrained("{name}")',
              f'processor = AutoProcessor.from_pretrained("{name}")  # without torchvision: import visual_rft.models first',
              "```", "", f"or `visual-rft predict {name} IMAGE` / `visual-rft eval CONFIG --model {name}`.", "",
              "## Config", "", "The resolved config the model was trained with:", "", "```yaml",
              yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)

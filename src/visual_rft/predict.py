"""`visual-rft predict`: ask a model about one image (or several), with the prompt building, generation,
parsing and rewards of training and eval (no copies of them here).

One sample decodes greedily, as `eval` does; `--samples N` draws a group the way GRPO does
(rl/fast.generate_grouped), and with `--solution` each sample gets every configured reward, the
weighted total and its group advantage. For detection and grounding the predicted boxes (and the
solution's, in green) are drawn on the image, in the task's box space (report/images.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from visual_rft.config import Config
from visual_rft.data.check import check_records
from visual_rft.data.record import Record, columns_of
from visual_rft.model_source import load_source, resolve_model_source, source_config
from visual_rft.models.loading import vision_token_ids
from visual_rft.report.images import PALETTE, Boxes, draw_image
from visual_rft.rewards import task_module, task_parser, task_rewards
from visual_rft.rl.advantages import group_advantages
from visual_rft.rl.fast import generate_grouped
from visual_rft.engine import make_accelerator
from visual_rft.runtime import prompt_batch, record_images, resolve_box_space
from visual_rft.tasks.boxes import BoxSpace
from visual_rft.tasks.prompts import build_prompt

BOX_TASKS = ("detection", "grounding")


def parse_fields(items: list[str]) -> dict[str, Any]:
    """`--field category=tree` -> {"category": "tree"}: record fields the prompt or parser reads."""
    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--field {item!r} is not of the form KEY=VALUE")
        fields[key.strip()] = value
    return fields


def predict_config(spec: str, *, task: str | None, question: str | None, config: str | None,
                   overrides: list[str]) -> tuple[Any, Config]:
    """The model's source and its config (the run's, when it is a run), with --task / --question."""
    source = resolve_model_source(spec)
    extra = [f"task.name={task}"] if task else []
    cfg = source_config(source, config, [*extra, *overrides])
    if task and cfg.task.rewards and not set(cfg.task.rewards) <= set(task_module(task).REWARDS):
        cfg.task.rewards, cfg.task.reward_weights = list(task_module(task).REWARDS), None  # the run's were another task's
    if question is not None:
        cfg.task.question = question
    cfg.output.report_to, cfg.output.tensorboard = [], False  # nothing is logged
    return source, cfg


def _image_record(images: list[str], cfg: Config, solution: str | None, fields: dict[str, Any]) -> Record:
    """The one record: its image (or images, in prompt order), the image's frame and the task's box
    space as fields, checked like data is (every image decodes, the solution parses) before any model loads."""
    paths = [Path(image) for image in images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    if len(paths) > 1 and cfg.task.name in BOX_TASKS:
        raise ValueError(f"{cfg.task.name} asks about one image (boxes live in its frame); got {len(paths)} images")
    record = Record(image=paths[0] if len(paths) == 1 else paths, problem="", solution=solution or "",
                    source=", ".join(map(str, paths)))
    # a ValueError naming the file if one does not decode
    shown = record_images(record, cfg.data.image_size, cfg.data.max_image_pixels)
    defaults: dict[str, Any] = {"image_size": list(shown[0].size)}
    if cfg.task.name == "detection":
        defaults["box_space"] = resolve_box_space(cfg)  # task.box_space, `auto` = the model family's
    record.fields = {**defaults, **fields}
    build_prompt(record, cfg.task)  # a question template's missing field is named now, not after loading
    if solution:
        report = check_records([record], cfg.task.name)
        if report.bad:
            raise ValueError(f"--solution: {report.problems[0][1]}")
    return record


def _sample_settings(cfg: Config, samples: int, temperature: float | None,
                     max_new_tokens: int | None) -> tuple[float, int]:
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if temperature is None:  # one answer: greedy, as eval; a group: the run's sampling temperature
        temperature = cfg.eval.temperature if samples == 1 else cfg.grpo.temperature
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise ValueError("--samples > 1 with --temperature 0 gives N copies of the greedy answer; give a temperature > 0")
    if max_new_tokens is None:
        max_new_tokens = cfg.eval.max_new_tokens if temperature == 0 else cfg.grpo.max_completion_length
    return temperature, max_new_tokens


def _score(cfg: Config, record: Record, texts: list[str],
           columns: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """Every configured reward, the weighted total and (for a group) the GRPO advantage; `columns`:
    more reward columns (a tool conversation's `tool_turns`, for its whole-conversation format)."""
    rewards = task_rewards(cfg.task, tools=cfg.tools)
    scores = rewards.score(texts, {**columns_of([record] * len(texts)), **(columns or {})})
    totals = rewards.total(scores)
    advantages = [None] * len(texts)
    if len(texts) > 1:
        advantages = group_advantages(torch.tensor(totals), len(texts), scale=cfg.grpo.scale_rewards).tolist()
    return [{"rewards": {name: scores[name][i] for name in rewards.names}, "reward": totals[i],
             "advantage": None if advantages[i] is None else round(advantages[i], 4)} for i in range(len(texts))]


def _draw(cfg: Config, record: Record, answers: list[Any], out: Path) -> Path:
    """The image with each sample's boxes (palette colours) and the solution's (green), written
    through a temporary file so a failure leaves no partial PNG."""
    from visual_rft.tasks import detection, grounding

    if cfg.task.name == "detection":
        space = BoxSpace.parse(record.fields.get("box_space") or BoxSpace.QWEN2VL)
        gt = detection.parse_solution(record.solution) if record.solution else []
        preds = [None if a is None else [box for box, _ in a] for a in answers]
    else:
        space = BoxSpace.QWEN2VL  # grounding answers are 0..1000 (tasks/grounding.py)
        gt = [grounding.parse_solution(record.solution)] if record.solution else []
        preds = [None if a is None else [a] for a in answers]
    size = record.fields.get("image_size")
    boxes = Boxes(gt, None, space, tuple(size) if size else None)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(preds))]
    image = draw_image(Path(str(record.image)), boxes, colors, preds)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def predict_image(spec: str, image: str | list[str], *, question: str | None = None, task: str | None = None,
                  samples: int = 1, temperature: float | None = None, solution: str | None = None,
                  out: str | None = None, fields: list[str] | None = None, config: str | None = None,
                  overrides: list[str] | None = None, max_new_tokens: int | None = None,
                  seed: int = 0, tool_images: str | None = None) -> dict[str, Any]:
    """Everything cheap is checked first (image, solution, settings); then the model loads. With
    tools.enabled (the run's config or an override) each sample is a tool conversation; the images
    the tools make are saved under `tool_images` (default IMAGE_STEM.tools/)."""
    source, cfg = predict_config(spec, task=task, question=question, config=config, overrides=overrides or [])
    images = [image] if isinstance(image, str) else list(image)
    record = _image_record(images, cfg, solution, parse_fields(fields or []))
    temperature, max_new_tokens = _sample_settings(cfg, samples, temperature, max_new_tokens)
    out_path = Path(out) if out else (Path(f"{Path(images[0]).stem}.boxes.png") if cfg.task.name in BOX_TASKS else None)
    folder = _tool_folder(cfg, tool_images, images[0])
    device = make_accelerator(cfg).device
    model, processor = load_source(source, cfg, device)
    suppress = vision_token_ids(processor, getattr(model, "config", None))
    torch.manual_seed(seed)
    if cfg.tools.enabled:
        prompt, rows, texts, columns = _converse(model, processor, record, cfg, device, samples, temperature,
                                                 max_new_tokens, suppress, folder)
    else:
        inputs, prompts = prompt_batch([record], cfg, processor, device, max_prompt_length=cfg.grpo.max_prompt_length)
        with torch.no_grad():
            _, mask, texts = generate_grouped(model, processor.tokenizer, inputs, samples,
                                              max_new_tokens=max_new_tokens, temperature=temperature,
                                              top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k, suppress_ids=suppress)
        prompt, rows, columns = prompts[0], [{"tokens": int(mask[i].sum())} for i in range(len(texts))], None
    parse = task_parser(cfg.task.name, cfg.task.mode)
    answers = [parse(text, **record.columns()) for text in texts]
    rows = [{"completion": text, "answer": answer, "parsed": answer is not None, **row}
            for text, answer, row in zip(texts, answers, rows)]
    if solution:
        for row, scored in zip(rows, _score(cfg, record, texts, columns)):
            row.update(scored)
    result: dict[str, Any] = {"model": source.model, "step": source.step, "task": cfg.task.name,
                              "thinking": cfg.task.thinking,
                              "prompt": prompt, "temperature": temperature, "samples": rows}
    if cfg.tools.enabled:
        result["tools"] = list(cfg.tools.names)
        if any(turn.get("image") for row in rows for turn in row["turns"]):
            result["tool_images"] = str(folder)
    if out_path is not None:
        result["image_out"] = str(_draw(cfg, record, answers, out_path))
    return result


def _tool_folder(cfg: Config, tool_images: str | None, image: str) -> Path | None:
    """Where the tools' images go (checked before the model loads); None without tools."""
    if not cfg.tools.enabled:
        if tool_images:
            raise ValueError("--tool-images saves the images tools make: it needs tools.enabled=true")
        return None
    folder = Path(tool_images) if tool_images else Path(f"{Path(image).stem}.tools")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--tool-images {folder} is a file, not a folder")
    return folder


def _converse(model: Any, processor: Any, record: Record, cfg: Config, device: torch.device, samples: int,
              temperature: float, max_new_tokens: int, suppress: list[int],
              folder: Path | None) -> tuple[str, list[dict[str, Any]], list[str], dict[str, list[Any]]]:
    """tools.enabled: each sample is a tool conversation (tool_eval.py), `max_new_tokens` per turn;
    the tools' images go to `folder` as <sample>-<k>.png. Returns the question, each
    sample's turns, its final turn (what is parsed and scored) and the reward columns of its turns."""
    from visual_rft.rl.tool_rollout import tool_columns
    from visual_rft.tool_eval import converse, predict_draw, sample_rows

    draw = predict_draw(model, processor, cfg, temperature=temperature, max_new_tokens=max_new_tokens,
                        suppress=suppress)
    with torch.no_grad():
        conversations = converse(model, processor, [record], cfg, device, draw, group_size=samples)
    rows = sample_rows(conversations, folder)
    return (conversations[0].conversation.prompt, rows, [c.final_text for c in conversations],
            tool_columns(conversations))


def format_prediction(result: dict[str, Any]) -> str:
    """The readable form `visual-rft predict` prints (--json prints the dict itself)."""
    step = f" (step {result['step']})" if result.get("step") is not None else ""
    n = len(result["samples"])
    how = "greedy" if result["temperature"] == 0 else f"temperature {result['temperature']:g}"
    thinking = f" · thinking {result['thinking']}" if result.get("thinking") else ""
    tools = f" · tools {', '.join(result['tools'])}" if result.get("tools") else ""
    lines = [f"{result['model']}{step} · {result['task']}{thinking}{tools} · {n} sample{'s' * (n > 1)}, {how}",
             f"prompt: {result['prompt']!r}"]
    for i, sample in enumerate(result["samples"], start=1):
        answer = repr(sample["answer"]) if sample["parsed"] else "unparsed"
        line = f"[{i}] answer {answer}"
        if "rewards" in sample:
            parts = ", ".join(f"{name} {value:.3g}" for name, value in sample["rewards"].items())
            line += f"  reward {sample['reward']:.3f} ({parts})"
            if sample["advantage"] is not None:
                line += f"  advantage {sample['advantage']:+.3f}"
        lines.append(line)
        lines += _turn_lines(sample["turns"], sample["truncated"]) if "turns" in sample else [
            f"    {sample['completion']!r}"]
    if result.get("image_out"):
        lines.append(f"boxes drawn: {result['image_out']}")
    if result.get("tool_images"):
        lines.append(f"tool images: {result['tool_images']}")
    return "\n".join(lines)


def _turn_lines(turns: list[dict[str, Any]], truncated: bool) -> list[str]:
    """A tool conversation turn by turn: the model's text, then the tool's answer and its image's file."""
    lines = []
    for k, turn in enumerate(turns, start=1):
        lines.append(f"    turn {k}: {turn['text']!r}")
        if turn.get("result") is not None:
            call = turn.get("call") or {}
            what = f"error {turn['error']}" if turn.get("error") else f"{call.get('name')} {call.get('arguments')}"
            lines.append(f"      tool {what} -> {turn['result']!r}")
        if turn.get("image"):
            lines.append(f"      tool image: {turn['image']}")
    if truncated:
        lines.append("    (cut: the last turn hit the token limit or tools.max_turns before an answer)")
    return lines

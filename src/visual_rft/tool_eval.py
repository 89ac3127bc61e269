"""Eval and predict of tool conversations ("thinking with images", issue 29).

The loop is the trainer's (rl/tool_rollout.run_conversations); only the draw differs: eval decodes
each turn greedily (eval.temperature) through rl/rollout.generate, `visual-rft predict` through
rl/fast.generate_grouped (a group of samples as GRPO draws them). The final turn is scored by the
task's verifier with the conversation as the `tool_turns` column (so `format` is the whole
conversation's, tools/rewards.py). A row keeps every turn (text, call, error, the tool's answer and,
with a folder, the path of the image the tool made, relative to that folder), the number of calls
and whether the conversation was cut. A model turn that is no valid call or answer is a 0 reward
and a counted metric (tool/call_error_rate, tool/errors/<kind>), never an exception.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from visual_rft.config import Config
from visual_rft.data.record import Record, columns_of
from visual_rft.evaluate import _jsonable
from visual_rft.rewards import RewardSet
from visual_rft.rl.engines.base import Generation
from visual_rft.rl.rollout import eos_token_ids, generate
from visual_rft.rl.tool_rollout import (Draw, ToolConversation, ToolRunner, run_conversations,
                                        summarize_tool_columns, tool_columns, tool_metric_columns)
from visual_rft.runtime import prompt_parts

TOOL_IMAGES = "tool_images"  # beside predictions.jsonl: <row>-<k>.png, the k-th image row <row>'s tools made

# sample(inputs, group_size, images_per_row) -> (ids [N, T], mask [N, T], texts): one turn of every row
Sample = Callable[[dict[str, torch.Tensor], int, list[int]], tuple[torch.Tensor, torch.Tensor, list[str]]]


def sampling_draw(sample: Sample) -> Draw:
    """The loop's draw over a plain generate function (no rollout engine, no seeds per turn)."""
    def draw(inputs: dict[str, torch.Tensor], images_per_row: list[int], group_size: int, turn: int,
             prompt_rows: list[int], row_images: list[Any]) -> Generation:
        ids, mask, texts = sample(inputs, group_size, images_per_row)
        return Generation(ids, mask, texts)

    return draw


def eval_draw(model: Any, processor: Any, cfg: Config, suppress: list[int]) -> Draw:
    """eval's turn: greedy (eval.temperature), eval.max_new_tokens per turn, vision tokens suppressed."""
    def sample(inputs: dict[str, torch.Tensor], group_size: int, _: list[int]):
        if group_size != 1:
            raise ValueError("eval draws one conversation per record")
        return generate(model, processor.tokenizer, inputs, max_new_tokens=cfg.eval.max_new_tokens,
                        temperature=cfg.eval.temperature, suppress_ids=suppress)

    return sampling_draw(sample)


def converse(model: Any, processor: Any, records: list[Record], cfg: Config, device: torch.device, draw: Draw,
             group_size: int = 1, runner: ToolRunner | None = None) -> list[ToolConversation]:
    """`group_size` conversations per record (record-major), each run to its end."""
    runner = runner or ToolRunner.from_config(cfg, processor)
    images, prompts = prompt_parts(records, cfg)
    return run_conversations(runner, processor, images, prompts, group_size, draw,
                             eos_token_ids(model, processor.tokenizer), device=device)


def conversation_rows(conversations: Sequence[ToolConversation], records: Sequence[Record], rewards: RewardSet, *,
                      first_row: int = 0, image_dir: Path | None = None) -> list[dict[str, Any]]:
    """One predictions.jsonl row per conversation (records[i] for conversation i): the final turn as
    `completion`, scored by every reward with the conversation as its `tool_turns`, and every turn.
    With `image_dir`, each tool image is written to image_dir/TOOL_IMAGES/<first_row + i>-<k>.png."""
    texts = [c.final_text for c in conversations]
    scored = rewards.score_all(texts, {**columns_of(list(records)), **tool_columns(conversations)})
    rows = []
    for i, (conv, record, text) in enumerate(zip(conversations, records, texts)):
        parsed = rewards.parse(text, **record.columns())
        save = None if image_dir is None else image_saver(image_dir, f"{TOOL_IMAGES}/{first_row + i}")
        rows.append({"source": record.source, "solution": record.solution, "completion": text,
                     "prediction": _jsonable(parsed), "parse_failed": scored.parse_failed[i],
                     "label": record.fields.get("label"), "completion_tokens": conversation_tokens(conv),
                     **conversation_fields(conv, save),
                     **{name: scored.components[name][i] for name in rewards.names}})
    return rows


def conversation_tokens(conv: ToolConversation) -> int:
    """Tokens the model generated over all its turns (end tokens included)."""
    return sum(t.tokens for t in conv.turns)


def conversation_fields(conv: ToolConversation, save: Callable[[Any, int], str] | None) -> dict[str, Any]:
    """`turns` (every turn as a dict), `tool_calls` (how many calls the tools answered), `truncated`.
    A call's turn names the image its tool made (`image`: what `save(image, k)` returns for the k-th
    image of the conversation) when there is a `save` and the tool returned an image."""
    turns, results, made = [], iter(conv.conversation.results), 0
    for turn in conv.turns:
        entry = turn.row()
        if turn.result is not None:
            image, _ = next(results)
            if image is not None:
                made += 1
                if save is not None:
                    entry["image"] = save(image, made)
        turns.append(entry)
    return {"turns": turns, "tool_calls": len(conv.calls), "truncated": conv.truncated}


def image_saver(folder: Path, stem: str) -> Callable[[Any, int], str]:
    """`save(image, k)` for conversation_fields: folder/<stem>-<k>.png, named relative to `folder`."""
    return lambda image, k: save_png(image, folder, f"{stem}-{k}.png")


def save_png(image: Any, folder: Path, name: str) -> str:
    """Write `image` as folder/name through a temporary file (no partial PNG); returns `name`."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return name


def predict_draw(model: Any, processor: Any, cfg: Config, *, temperature: float, max_new_tokens: int,
                 suppress: list[int]) -> Draw:
    """`visual-rft predict`'s turn: a group of samples as GRPO draws them (rl/fast.generate_grouped)
    at the first turn, one per live conversation after it."""
    from visual_rft.models.loading import pixel_rows_per_prompt
    from visual_rft.rl.fast import generate_grouped

    def sample(inputs: dict[str, torch.Tensor], group_size: int, images_per_row: list[int]):
        return generate_grouped(model, processor.tokenizer, inputs, group_size, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k,
                                suppress_ids=suppress, images_per_row=images_per_row,
                                pixel_rows=pixel_rows_per_prompt(processor, inputs))

    return sampling_draw(sample)


def sample_rows(conversations: Sequence[ToolConversation], image_dir: Path | None) -> list[dict[str, Any]]:
    """`visual-rft predict`'s view of each sample's conversation; tool images written to
    image_dir/<sample>-<k>.png (sample from 1), each turn naming its file's path."""
    rows = []
    for i, conv in enumerate(conversations, start=1):
        save = None if image_dir is None else (lambda image, k, i=i: str(image_dir / save_png(image, image_dir,
                                                                                                f"{i}-{k}.png")))
        rows.append({"tokens": conversation_tokens(conv), **conversation_fields(conv, save)})
    return rows


# ------------------------------------------------------------------------------------ metrics
def tool_metrics(rows: list[dict[str, Any]], headline: str) -> dict[str, Any]:
    """Tool metrics of eval rows, as the trainer's tool/* step metrics (summarize_tool_columns), plus
    the share of conversations cut (tool/truncated_rate) and the task's headline reward (`headline`:
    accuracy, iou, giou) of the conversations with a call and of those without (None: there are none)."""
    if not rows:
        return {}
    out = summarize_tool_columns(tool_metric_columns([r["turns"] for r in rows]))
    out["tool/truncated_rate"] = sum(bool(r["truncated"]) for r in rows) / len(rows)
    if "tool_calls_ok" in rows[0]:
        out["tool_calls_ok"] = sum(r["tool_calls_ok"] for r in rows) / len(rows)
    for name, called in (("with_call", True), ("without_call", False)):
        part = [r[headline] for r in rows if bool(r["tool_calls"]) is called and headline in r]
        out[f"tool/{headline}_{name}"] = sum(part) / len(part) if part else None
        out[f"tool/conversations_{name}"] = len(part)
    return out


def headline_reward(names: Sequence[str]) -> str:
    """The task's answer reward (its first that is not format): accuracy, iou or giou."""
    return next((n for n in names if n not in ("format", "tool_calls_ok")), "format")

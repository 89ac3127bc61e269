"""The supervised baseline: teach `<think>{sft.think}</think><answer>label</answer>` on the same
records, for the paper's SFT-vs-RFT comparison. It shares the trainer's data order, optimiser,
checkpoint layout and scoring forward (completion_logprobs), so the two differ only in the loss.
With tools.enabled it imitates each record's trajectory of tool calls before that answer
(tool_sft.py): the warm-up a tool-using policy needs before GRPO with tools."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from visual_rft.config import Config, save_config
from visual_rft.data.record import Record
from visual_rft.evaluate import TrainingEval
from visual_rft.engine import Engine
from visual_rft.optim import NonFiniteGuard, make_scheduler, seed_everything, shard, step_indices, total_steps
from visual_rft.rl.loss import masked_mean
from visual_rft.rl.rollout import completion_logprobs
from visual_rft.runlog import PhaseTimer, RunLog
from visual_rft.runtime import load_policy, load_split, prompt_batch

_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def sft_target(record: Record, think: str, thinking: str = "on") -> str:
    """The assistant text to imitate: the configured reasoning, then the solution's answer block
    (task.thinking=off: the answer block alone)."""
    match = _ANSWER.search(record.solution)
    answer = match.group(0) if match else f"<answer>{record.solution.strip()}</answer>"
    return f"<think>{think}</think>{answer}" if thinking == "on" else answer


def turn_end_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: `<|im_end|>` where the vocabulary has it, else EOS."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return eos if isinstance(eos, int) and eos != tokenizer.unk_token_id else tokenizer.eos_token_id


def target_ids(text: str, tokenizer: Any) -> list[int]:
    """One assistant turn to imitate: its text's tokens, then the turn's end token."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [turn_end_id(tokenizer)]


def target_batch(texts: list[str], tokenizer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids ending in EOS, and their mask."""
    rows = [target_ids(t, tokenizer) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def sft_loss(model: Any, processor: Any, records: list[Record], cfg: Config, device: torch.device,
             tools: Any = None) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (the prompt is context only). `tools` (a
    ToolRunner, tools.enabled): each record's trajectory of tool calls, then its answer (tool_sft.py)."""
    if tools is not None:
        from visual_rft.tool_sft import tool_sft_loss

        return tool_sft_loss(model, processor, tools, records, cfg, device)
    inputs, _ = prompt_batch(records, cfg, processor, device)
    ids, mask = target_batch([sft_target(r, cfg.sft.think, cfg.task.thinking) for r in records], processor.tokenizer, device)
    return -masked_mean(completion_logprobs(model, inputs, ids, mask), mask)


def tool_runner(cfg: Config, processor: Any) -> Any:
    """The trainer's ToolRunner when tools.enabled (SFT then imitates each record's `tool_calls`), else None."""
    if not cfg.tools.enabled:
        return None
    from visual_rft.rl.tool_rollout import ToolRunner

    return ToolRunner.from_config(cfg, processor)


def train_sft(cfg: Config, records: list[Record] | None = None) -> Path:
    """Fine-tune model.name_or_path on the training split; writes checkpoints to output.dir. Without
    `records` (the command line) the split and data.eval come from the config, and data.eval is
    evaluated as eval.steps says; with `records` (the demo, which evaluates on its own) it is not."""
    s = cfg.sft
    evaluator = TrainingEval.from_config(cfg) if records is None else None
    records = records if records is not None else load_split(cfg, "train")
    engine = Engine(cfg, "sft", micro_batch=s.batch_size, grad_accum=s.grad_accum_steps, max_grad_norm=s.optim.max_grad_norm)
    accelerator = engine.accelerator
    seed_everything(s.seed)
    with engine.building():
        model, processor = load_policy(cfg, accelerator.device, dtype=engine.load_dtype(cfg.model.dtype))
    tools = tool_runner(cfg, processor)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_step = s.batch_size * s.grad_accum_steps * world
    steps = total_steps(len(records), per_step, s.num_epochs, s.max_steps)
    optimizer = engine.optimizer(model, s.optim)
    scheduler = make_scheduler(optimizer, s.optim, steps)
    model, optimizer = engine.prepare(model, optimizer)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log = RunLog(out, enabled=accelerator.is_main_process, accelerator=accelerator, cfg=cfg)
    timer = PhaseTimer()
    guard = NonFiniteGuard(s.optim.max_nonfinite_steps)
    model.train()
    for step in tqdm(range(steps), desc="sft", disable=not cfg.output.progress):
        indices = step_indices(step, per_step, len(records), s.seed)
        losses = []
        micro = shard(indices, s.batch_size, rank, world)
        with timer.phase("update"):
            for m, chunk in enumerate(micro):
                with engine.micro_batch(model, last=m == len(micro) - 1):  # gradients reduced once per step
                    loss = sft_loss(model, processor, [records[i] for i in chunk], cfg, accelerator.device, tools)
                    engine.backward(model, loss / len(micro))
                losses.append(loss.item())
            grad_norm, stepped = engine.step(model, optimizer, scheduler)
        guard.record(step + 1, stepped)
        evaluated = evaluator.maybe_run(step + 1, steps, accelerator, model, processor, log) if evaluator else {}
        if (step + 1) % max(cfg.output.log_steps, 1) == 0 or step + 1 == steps:
            mean_loss = accelerator.reduce(torch.tensor(sum(losses) / len(losses), device=accelerator.device), "mean")
            log.metrics(step + 1, {"loss": mean_loss.item(), "grad_norm": grad_norm,
                                   "lr": scheduler.get_last_lr()[0],
                                   "skipped_steps_total": guard.total, **timer.pop(), **evaluated})
    engine.save(model, out, steps, processor=processor, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                keep=cfg.output.save_total_limit, extra={"total_steps": steps})
    log.close()
    return out

"""SFT on tool-use trajectories (issue 29): the warm-up that teaches a policy to call image tools
before GRPO with tools (`visual-rft sft` with tools.enabled; sft.py is the entry point).

Each record becomes the conversation a rollout would make if the model followed the record's expert
trajectory (its `tool_calls`, tools/trajectory.py): the prompt with the tools listed in the system
turn (the trainer's ToolRunner), then for each call the model turn
`<think>{tools.think}</think><tool_call>\\n{json}\\n</tool_call>` tokenized as one-turn SFT tokenizes
its target (text, then the turn's end token), the call run by the registry and its result appended
as the next user turn; then the final turn, sft_target(record). The loss is the masked mean NLL of
every token the model writes (Conversation.loss_mask: the call turns and the answer, their end tokens
included; not the prompt, the tool results or their images), from one forward of the left-padded
batch, as the trainer scores tool rollouts (rl/tool_rollout.written_tail + tail_logprobs).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from visual_rft.config import Config
from visual_rft.data.errors import DataError
from visual_rft.data.record import Record
from visual_rft.rl.loss import masked_mean
from visual_rft.rl.rollout import tail_logprobs
from visual_rft.rl.tool_rollout import ToolRunner, written_tail
from visual_rft.runtime import prompt_parts
from visual_rft.sft import sft_target, target_ids
from visual_rft.tools.calls import TurnKind
from visual_rft.tools.conversation import Conversation
from visual_rft.tools.trajectory import call_turn, trajectory


def record_conversation(runner: ToolRunner, processor: Any, record: Record, images: list[Image.Image],
                        prompt: str, cfg: Config) -> Conversation:
    """The record's expert conversation: its trajectory's calls, each answered by its tool, then its answer.
    `images` and `prompt`: the record's prompt parts (runtime.prompt_parts)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    conv = runner.start(processor, prompt, images)
    for index, call in enumerate(trajectory(record.fields)):
        text = call_turn(call, cfg.tools.think, cfg.task.thinking)
        conv.add_model_turn(target_ids(text, tokenizer))
        turn = runner.answer(conv, text)
        if turn.kind is not TurnKind.TOOL_CALL or not turn.well_formed:
            problem = turn.error.message if turn.error else "not a well-formed tool call"
            raise DataError(f"{record.source or 'record'}: tool_calls[{index}]: {problem} "
                            "(`visual-rft data check` with tools.enabled checks every trajectory)")
    conv.add_model_turn(target_ids(sft_target(record, cfg.sft.think, cfg.task.thinking), tokenizer))
    return conv


def trajectory_conversations(runner: ToolRunner, processor: Any, records: list[Record],
                             cfg: Config) -> list[Conversation]:
    """Every record's expert conversation, in order."""
    images, prompts = prompt_parts(records, cfg)
    return [record_conversation(runner, processor, record, imgs, prompt, cfg)
            for record, imgs, prompt in zip(records, images, prompts)]


def conversations_nll(model: Any, conversations: list[Conversation], device: torch.device | str) -> torch.Tensor:
    """Mean negative log-likelihood of the model-written tokens of `conversations`, one forward."""
    batch, tail, mask = written_tail(conversations, device)
    return -masked_mean(tail_logprobs(model, batch, tail), mask)


def tool_sft_loss(model: Any, processor: Any, runner: ToolRunner, records: list[Record], cfg: Config,
                  device: torch.device | str) -> torch.Tensor:
    """SFT's loss with tools: the NLL of each record's expert conversation (calls and answer)."""
    return conversations_nll(model, trajectory_conversations(runner, processor, records, cfg), device)

"""Multi-turn tool rollouts ("thinking with images", issue 29): the loop above a rollout engine.

Each conversation starts from its record's prompt, with the tools listed in the system turn. Every
turn, one call draws the next model turn of every conversation still going; a turn with a tool call
gets the tool's answer (its image and a short text) as the next user turn, a turn without one ends
the conversation, and so does a turn cut at the token limit (it has no end token to continue after)
or the last of `tools.max_turns`. The first turn draws G samples per prompt (so the engine's
prefill-once applies); later turns one per live conversation, since their images differ.

The loop knows nothing of engines: `draw(...)` (Draw below) samples one turn of every row it gets.
The trainer passes its rollout engine, eval and predict a greedy decode (evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from visual_rft.config import Config
from visual_rft.data.record import Record
from visual_rft.data.targets import qwen_input_size
from visual_rft.rl.engines.base import Generation
from visual_rft.rl.rollout import Rollout
from visual_rft.runtime import resolve_box_space
from visual_rft.tools.calls import ErrorKind, Turn, TurnKind, classify_turn
from visual_rft.tools.conversation import Conversation, batch_inputs
from visual_rft.tools.registry import ToolSettings, ToolSpec, respond, select_tools, tools_prompt

# draw(inputs, images_per_row, group_size, turn, prompt_rows, row_images) -> one turn of every input row;
# prompt_rows[i] is the prompt (index into the rollout's records) that input row i continues, row_images[i]
# that row's images in order (the prompt's, then the tools'), for engines that take token prompts (vLLM).
Draw = Callable[[dict[str, torch.Tensor], list[int], int, int, list[int], list[list[Image.Image]]], Generation]


@dataclass
class ToolTurn:
    """One model turn of a conversation and what answered it."""

    text: str  # the model's turn, decoded
    tokens: int  # generated tokens, its end token included
    well_formed: bool  # think + call, or think + answer (tools.calls.classify_turn)
    call: dict[str, Any] | None = None  # {"name", "arguments"} of a call that parsed
    error: str | None = None  # the ErrorKind value of a call that could not run
    result: str | None = None  # the tool's answer text (None: the final turn)
    sampler_logp: list[float] | None = None  # the engine's log-probs of the turn's tokens (vLLM), if it gave them

    def row(self) -> dict[str, Any]:
        """The turn as logged (rollouts.jsonl, predictions.jsonl) and as the rewards' `tool_turns` column."""
        return {"text": self.text, "call": self.call, "error": self.error, "result": self.result,
                "tokens": self.tokens, "well_formed": self.well_formed}


@dataclass
class ToolConversation:
    """A finished rollout: the conversation (token ids, images, loss mask) and its turns."""

    conversation: Conversation
    turns: list[ToolTurn] = field(default_factory=list)
    truncated: bool = False  # the last turn was cut at the token limit, or the turns ran out on a call

    @property
    def final_text(self) -> str:
        """What the task's verifier scores: the last turn (a final answer, unless the rollout was cut)."""
        return self.turns[-1].text if self.turns else ""

    @property
    def calls(self) -> list[ToolTurn]:
        return [t for t in self.turns if t.result is not None]

    def rows(self) -> list[dict[str, Any]]:
        return [t.row() for t in self.turns]


@dataclass(frozen=True)
class ToolRunner:
    """A run's tools: which ones, how calls run, the system text that lists them, the turn limit."""

    tools: dict[str, ToolSpec]
    settings: ToolSettings
    system: str
    max_turns: int
    thinking: str

    @classmethod
    def from_config(cls, cfg: Config, processor: Any) -> "ToolRunner":
        tools = select_tools(cfg.tools.names)
        space = resolve_box_space(cfg)
        listing = tools_prompt(tools, space)
        system = f"{cfg.task.system_prompt}\n\n{listing}" if cfg.task.system_prompt else listing
        settings = ToolSettings(box_space=space, zoom_pixels=cfg.tools.zoom_pixels, frame=_frame(processor, space))
        return cls(tools, settings, system, cfg.tools.max_turns, cfg.task.thinking)

    def start(self, processor: Any, prompt: str, images: Sequence[Image.Image]) -> Conversation:
        return Conversation(processor, prompt, images, system=self.system)

    def answer(self, conv: Conversation, text: str) -> Turn:
        """Classify the model's latest turn; a tool call gets its answer appended to `conv`."""
        turn = classify_turn(text, self.tools, thinking=self.thinking)
        if turn.kind is TurnKind.TOOL_CALL:
            result = respond(turn, conv.images, self.settings, self.tools)
            conv.add_tool_result(result.image, result.text)
            return Turn(turn.kind, turn.well_formed and result.error is None, turn.call,
                        turn.error or result.error)
        return turn


def _frame(processor: Any, space: str) -> Callable[[Image.Image], tuple[float, float]] | None:
    """Pixel boxes refer to the image the model saw: Qwen-VL's processor resizes (smart_resize)."""
    image_processor = getattr(processor, "image_processor", None)
    low, high = getattr(image_processor, "min_pixels", None), getattr(image_processor, "max_pixels", None)
    if space != "pixels" or low is None or high is None:
        return None
    return lambda image: qwen_input_size(*image.size, min_pixels=low, max_pixels=high)


def run_conversations(runner: ToolRunner, processor: Any, images: list[list[Image.Image]], prompts: list[str],
                      group_size: int, draw: Draw, eos_ids: Sequence[int], *,
                      device: torch.device | str = "cpu") -> list[ToolConversation]:
    """`group_size` conversations per prompt (row i*G + j = sample j of prompt i), each run to its end;
    a turn ended on its own when its last token is one of `eos_ids`."""
    done = [ToolConversation(runner.start(processor, p, imgs)) for p, imgs in zip(prompts, images)
            for _ in range(group_size)]
    live = list(range(len(done)))
    for turn in range(runner.max_turns):
        if not live:
            break
        rows = live if turn else live[::group_size]  # the first turn: one row per prompt, G samples each
        convs = [done[i].conversation for i in rows]
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_inputs(convs).items()}
        drawn = draw(inputs, [len(c.images) for c in convs], 1 if turn else group_size, turn,
                     [i // group_size for i in rows], [list(c.images) for c in convs])
        last = turn == runner.max_turns - 1
        live = [i for row, i in enumerate(live) if _add_turn(runner, done[i], drawn, row, set(eos_ids), last=last)]
    return done


def _add_turn(runner: ToolRunner, conv: ToolConversation, drawn: Generation, row: int, eos: set[int], *,
              last: bool) -> bool:
    """Append row `row` of `drawn` to `conv` (and the tool's answer to a call); True if it goes on."""
    length = int(drawn.mask[row].sum())
    ids = drawn.ids[row, :length].tolist()
    text = drawn.texts[row]
    logp = drawn.sampler_logp[row, :length].tolist() if drawn.sampler_logp is not None else None
    ended = bool(ids) and ids[-1] in eos
    if ids:
        conv.conversation.add_model_turn(ids)
    if not ended or last:  # no end token to continue after, or no turn left: the rollout stops here
        turn = classify_turn(text, runner.tools, thinking=runner.thinking)
        conv.truncated = not ended or turn.kind is TurnKind.TOOL_CALL
        conv.turns.append(_record(turn, text, length, result=None, logp=logp))
        return False
    turn = runner.answer(conv.conversation, text)
    result = conv.conversation.results[-1][1] if turn.kind is TurnKind.TOOL_CALL else None
    conv.turns.append(_record(turn, text, length, result, logp=logp))
    return turn.kind is TurnKind.TOOL_CALL


def _record(turn: Turn, text: str, tokens: int, result: str | None, *, logp: list[float] | None = None) -> ToolTurn:
    call = {"name": turn.call.name, "arguments": dict(turn.call.arguments)} if turn.call is not None else None
    return ToolTurn(text, tokens, turn.well_formed, call, turn.error.kind.value if turn.error else None, result,
                    sampler_logp=logp)


def conversation_rollout(records: list[Record], prompts: list[str], conversations: list[ToolConversation], *,
                         group_size: int, temperature: float, device: torch.device | str = "cpu") -> Rollout:
    """The trainer's Rollout of finished conversations (G per record, in order): every row's whole
    conversation as `sequence_inputs`; completion_ids its last T tokens, T covering every row's turns
    after its prompt; completion_mask 1 on the tokens the model generated there (tool results, their
    image tokens and the template's markers are 0); sampler_logp the engine's log-probs on the model's
    tokens where every turn came with them (vLLM: the mismatch correction), else None."""
    full, tail_ids, mask = written_tail([c.conversation for c in conversations], device)
    rows = [r for r in records for _ in range(group_size)]
    sampler = _sampler_logp(conversations, tail_ids.size(1))
    return Rollout(rows, [p for p in prompts for _ in range(group_size)], {}, tail_ids, mask,
                   [c.final_text for c in conversations], group_size=group_size,
                   temperature=temperature, truncated=torch.tensor([c.truncated for c in conversations]),
                   sequence_inputs=full, conversations=conversations,
                   sampler_logp=sampler.to(device) if sampler is not None else None)


def _sampler_logp(conversations: Sequence[ToolConversation], tail: int) -> torch.Tensor | None:
    """[N, tail] the engine's log-probs at each model turn's tokens (0 elsewhere), laid out as
    conversation_rollout's completion_ids; None unless every turn came with them."""
    turns = [t for c in conversations for t in c.turns]
    if not turns or any(t.sampler_logp is None for t in turns):
        return None
    out = torch.zeros(len(conversations), tail)
    for row, c in enumerate(conversations):
        conv = c.conversation
        shift = tail - conv.input_ids().numel()  # tail position of sequence position p: p + shift
        written = [t for t in c.turns if t.tokens > 0]  # a turn of no tokens added nothing to the conversation
        for (start, end), turn in zip(conv.turn_spans(), written):
            out[row, start + shift:end + shift] = torch.tensor(turn.sampler_logp)
    return out


def written_tail(conversations: Sequence[Conversation], device: torch.device | str = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Conversations as one left-padded batch (batch_inputs), its last T tokens [N, T] (T covering every
    row's turns after its prompt) and their mask: 1 on the model-written tokens, as conversation_rollout
    lays them out (tool SFT scores its trajectories with this; tail_logprobs reads the tail)."""
    full = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_inputs(conversations).items()}
    tail = max(1, max(c.input_ids().numel() - c.prompt_length() for c in conversations))
    mask = torch.zeros(len(conversations), tail, dtype=torch.long)
    for row, conv in enumerate(conversations):
        written = conv.loss_mask()[conv.prompt_length():]
        mask[row, tail - written.numel():] = written
    return full, full["input_ids"][:, -tail:], mask.to(device)


def turn_seed(seed: int | None, turn: int) -> int | None:
    """Turn `turn`'s sampling seed: the micro-batch slot's own for the first turn (as one-turn rollouts
    draw), then distinct per turn."""
    return None if seed is None else (seed + turn * 1_000_000_007) % (2**63 - 1)


def tool_columns(conversations: Sequence[ToolConversation]) -> dict[str, list[Any]]:
    """Reward columns of finished conversations: `tool_turns`, each row's turns as dicts."""
    return {"tool_turns": [c.rows() for c in conversations],
            "tool_truncated": [c.truncated for c in conversations]}


def tool_metric_columns(conversations: Sequence[Sequence[dict[str, Any]]]) -> dict[str, torch.Tensor]:
    """Per-conversation counts [N] for the metrics, from each conversation's turns as dicts (ToolTurn.row:
    the trainer's conversations, or eval's predictions.jsonl rows); a call is a turn the tool answered.
    The trainer gathers them over processes, then both summarize them (summarize_tool_columns)."""
    calls = [[t for t in turns if t["result"] is not None] for turns in conversations]
    columns = {"tool/calls": [len(c) for c in calls], "tool/called": [bool(c) for c in calls],
               "tool/turns": [len(turns) for turns in conversations],
               "tool/call_errors": [sum(t["error"] is not None for t in c) for c in calls]}
    for kind in ErrorKind:
        columns[f"tool/errors/{kind.value}"] = [sum(t["error"] == kind.value for t in c) for c in calls]
    return {key: torch.tensor(values, dtype=torch.float32) for key, values in columns.items()}


def summarize_tool_columns(table: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's tool metrics: calls and turns per conversation, the share of conversations that called
    a tool, and the share of calls that failed, overall and per error kind."""
    if not table:
        return {}
    calls = max(float(table["tool/calls"].sum()), 1.0)
    out = {"tool/calls_mean": table["tool/calls"].mean().item(), "tool/call_rate": table["tool/called"].mean().item(),
           "tool/turns_mean": table["tool/turns"].mean().item(),
           "tool/call_error_rate": float(table["tool/call_errors"].sum()) / calls}
    out.update({key: float(values.sum()) / calls for key, values in table.items() if key.startswith("tool/errors/")})
    return out

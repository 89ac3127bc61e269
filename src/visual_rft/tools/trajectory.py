"""Expert trajectories: the tool calls a record's `tool_calls` field says to make before answering.

A trajectory is a list of calls `{"name": ..., "arguments": {...}}` (empty or absent: answer
directly). SFT on tool use (tool_sft.py) writes each call as the model turn

    <think>{tools.think}</think><tool_call>
    {"name": "rotate", "arguments": {"angle": 90}}
    </tool_call>

(thinking off: the call block alone), the layout tools.calls parses. `trajectory_problem` is the
data check's view of one record: every call parses as that turn would and runs on the record's
images (each result joins the conversation's images, so a call may use an earlier result).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from PIL import Image

from visual_rft.tasks.common import THINK_CLOSE, THINK_OPEN
from visual_rft.tools.calls import CALL_CLOSE, CALL_OPEN, TurnKind, classify_turn
from visual_rft.tools.registry import ToolSettings, ToolSpec, execute

FIELD = "tool_calls"


def trajectory(fields: Mapping[str, Any]) -> list[Any]:
    """The record's calls, in order ([] when the field is absent or null)."""
    calls = fields.get(FIELD)
    return [] if calls is None else calls


def call_turn(call: Mapping[str, Any], think: str, thinking: str = "on") -> str:
    """The model turn that makes `call` (task.thinking=off: the call block alone)."""
    block = f"{CALL_OPEN}\n{json.dumps(call)}\n{CALL_CLOSE}"
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{block}" if thinking == "on" else block


def trajectory_problem(fields: Mapping[str, Any], images: Sequence[Image.Image] | None,
                       tools: Mapping[str, ToolSpec], settings: ToolSettings, *, think: str,
                       thinking: str = "on", max_turns: int | None = None) -> str | None:
    """Why the record's trajectory cannot be trained on, else None. `images`: the record's images as
    the run sees them (None: parse the calls only); `max_turns`: tools.max_turns (calls + the answer)."""
    calls = fields.get(FIELD)
    if calls is None:
        return None
    if not isinstance(calls, list):
        return f"{FIELD} must be a list of calls, got {type(calls).__name__}"
    if max_turns is not None and len(calls) >= max_turns:
        return (f"{FIELD} has {len(calls)} calls, but tools.max_turns={max_turns} leaves room for "
                f"{max_turns - 1} before the answer")
    shown = list(images) if images is not None else None
    for index, call in enumerate(calls):
        where = f"{FIELD}[{index}]"
        if not isinstance(call, dict):
            return f"{where}: a call is {{\"name\": ..., \"arguments\": {{...}}}}, got {type(call).__name__}"
        try:
            text = call_turn(call, think, thinking)
        except (TypeError, ValueError) as exc:  # not JSON-serialisable
            return f"{where}: {exc}"
        turn = classify_turn(text, tools, thinking=thinking)
        if turn.kind is not TurnKind.TOOL_CALL or turn.error is not None:
            return f"{where}: {turn.error.message if turn.error else 'not a tool call'}"
        if not turn.well_formed:
            return f"{where}: the call does not make a well-formed turn"
        if shown is not None:
            result = execute(turn.call, shown, settings, tools)
            if result.error is not None:
                return f"{where}: {result.error.message}"
            shown.append(result.image)
    return None


@dataclass(frozen=True)
class TrajectoryCheck:
    """What the data check needs to validate trajectories as a run with tools would make them."""

    tools: Mapping[str, ToolSpec]
    settings: ToolSettings
    think: str
    thinking: str = "on"
    max_turns: int | None = None
    image_size: int | None = None  # data.image_size: calls run on the images as the model sees them

    def problem(self, fields: Mapping[str, Any], images: Sequence[Image.Image] | None) -> str | None:
        if images is not None and self.image_size:
            size = (self.image_size, self.image_size)
            images = [im.resize(size, Image.BILINEAR) if im.size != size else im for im in images]
        return trajectory_problem(fields, images, self.tools, self.settings, think=self.think,
                                  thinking=self.thinking, max_turns=self.max_turns)

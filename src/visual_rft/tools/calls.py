"""Reading a model turn: is it a tool call or the final answer, and what exactly does the call ask for.

The call layout is the one Qwen's chat templates (Qwen2.5, Qwen3, Qwen3-VL) teach their models:

    <think>I need a closer look.</think>
    <tool_call>
    {"name": "zoom", "arguments": {"box": [120, 340, 260, 480]}}
    </tool_call>

A turn that contains `<tool_call>` is a tool-call turn; any other turn is the final turn, which ends
the rollout and is scored by the task's verifier. Parsing is bounded and never raises: the turn is
refused past MAX_TURN_CHARS and the call past MAX_CALL_CHARS before any json is read; only
`json.loads` reads the call (no eval), with duplicate keys refused. A call that cannot run becomes a
ToolError whose `kind` a metric counts and whose `message` is what the tool answers the model.

Checked here: the layout, the JSON, the tool's name, its argument names and their types (a box is 4
finite numbers, a choice one of its values, an image index a positive integer). Checked when the
call runs (registry.execute), because they need the images: the box's range and the image index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from visual_rft.tasks.boxes import is_finite_box
from visual_rft.tasks.common import (ANSWER_CLOSE, ANSWER_OPEN, MAX_PARSE_CHARS, THINK_CLOSE, THINK_OPEN,
                                     format_ok_answer_only, format_ok_strict)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TURN_CHARS = MAX_PARSE_CHARS
MAX_CALL_CHARS = 1_000  # a real call is under 100 characters
_ECHO_CHARS = 40  # how much of the model's own text an error message quotes back


class ErrorKind(str, Enum):
    """Why a tool call could not run; each kind is one counter in the run's metrics."""

    TOO_LONG = "too_long"  # the turn or the call is over its size cap
    UNCLOSED = "unclosed"  # <tool_call> without </tool_call> (or the tags out of order)
    SEVERAL_CALLS = "several_calls"  # more than one <tool_call> in a turn
    CALL_WITH_ANSWER = "call_with_answer"  # a tool call and an <answer> in the same turn
    BAD_JSON = "bad_json"  # not valid JSON (or a key given twice)
    BAD_CALL = "bad_call"  # JSON, but not {"name": ..., "arguments": {...}}
    UNKNOWN_TOOL = "unknown_tool"
    UNKNOWN_ARGUMENT = "unknown_argument"
    MISSING_ARGUMENT = "missing_argument"
    BAD_ARGUMENT = "bad_argument"  # wrong type or a value outside the tool's choices
    BAD_BOX = "bad_box"  # not a proper box inside the image (checked when the call runs)
    BAD_SIZE = "bad_size"  # the box covers less than a pixel, or is too thin for the processor
    BAD_IMAGE = "bad_image"  # no image with that number in the conversation


@dataclass(frozen=True)
class ToolError:
    """A call that cannot run: `message` is the tool's answer to the model."""

    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class ToolCall:
    """A call that passed every check calls.py can make: a known tool and well-typed arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


class TurnKind(str, Enum):
    TOOL_CALL = "tool_call"  # the rollout runs the call (or answers its error) and continues
    FINAL = "final"  # no tool call: the rollout ends and the answer is scored


@dataclass(frozen=True)
class Turn:
    """One model turn, classified. Exactly one of `call` / `error` is set on a TOOL_CALL turn."""

    kind: TurnKind
    well_formed: bool  # the turn's layout (think + call, or think + answer), for the format reward
    call: ToolCall | None = None
    error: ToolError | None = None


# What an error message may quote of the model's text: no "<", ">" or "|", so an echo can never spell a
# chat-template or image token ("<|im_start|>", "<|image_pad|>") inside the tool's answer.
_UNQUOTABLE = re.compile(r"[^A-Za-z0-9 _.,:;=+*/()\[\]{}'\"-]")


def _echo(text: str) -> str:
    """A short, harmless quote of the model's text for an error message."""
    clipped = text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."
    return repr(_UNQUOTABLE.sub("?", clipped))


def _fail(kind: ErrorKind, message: str) -> ToolError:
    return ToolError(kind, f"error ({kind.value}): {message}")


def classify_turn(text: str, tools: Mapping[str, Any], *, thinking: str = "on") -> Turn:
    """Classify one model turn and parse its call against `tools` (name -> registry.ToolSpec).

    `thinking` ("on" / "off", task.thinking) decides the well-formed layout: a think block before
    the call or the answer, or the call / answer block alone.
    """
    text = text if isinstance(text, str) else ""
    if CALL_OPEN not in text:
        ok = format_ok_answer_only(text) if thinking == "off" else format_ok_strict(text)
        return Turn(TurnKind.FINAL, ok)
    parsed = parse_call(text, tools)
    ok = isinstance(parsed, ToolCall) and _call_layout_ok(text, thinking)
    if isinstance(parsed, ToolError):
        return Turn(TurnKind.TOOL_CALL, False, error=parsed)
    return Turn(TurnKind.TOOL_CALL, ok, call=parsed)


def _call_layout_ok(text: str, thinking: str) -> bool:
    """`<think>…</think>` (unless thinking is off), whitespace, the one call block, nothing after."""
    s = text.strip()
    start = s.index(CALL_OPEN)
    if not s.endswith(CALL_CLOSE):
        return False
    head = s[:start].strip()
    if thinking == "off":
        return head == ""
    inner = head[len(THINK_OPEN):-len(THINK_CLOSE)]
    return (head.startswith(THINK_OPEN) and head.endswith(THINK_CLOSE) and bool(inner.strip())
            and THINK_OPEN not in inner and THINK_CLOSE not in inner)


def parse_call(text: str, tools: Mapping[str, Any]) -> ToolCall | ToolError:
    """The one tool call in a turn, checked against `tools`, or the ToolError that answers it."""
    if len(text) > MAX_TURN_CHARS:
        return _fail(ErrorKind.TOO_LONG, f"the turn is over {MAX_TURN_CHARS} characters")
    if text.count(CALL_OPEN) > 1:
        return _fail(ErrorKind.SEVERAL_CALLS, "call one tool per turn")
    if ANSWER_OPEN in text or ANSWER_CLOSE in text:
        return _fail(ErrorKind.CALL_WITH_ANSWER, "a turn either calls a tool or gives the answer, not both")
    start = text.find(CALL_OPEN) + len(CALL_OPEN)
    end = text.find(CALL_CLOSE, start)
    if end < 0 or text.count(CALL_CLOSE) != 1:
        return _fail(ErrorKind.UNCLOSED, f"write the call as {CALL_OPEN}{{...}}{CALL_CLOSE}")
    body = text[start:end].strip()
    if len(body) > MAX_CALL_CHARS:
        return _fail(ErrorKind.TOO_LONG, f"the call is over {MAX_CALL_CHARS} characters")
    try:
        call = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so is a duplicate key
        return _fail(ErrorKind.BAD_JSON, f"the call is not a JSON object: {_echo(body)}")
    return _check_call(call, tools)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _check_call(call: Any, tools: Mapping[str, Any]) -> ToolCall | ToolError:
    layout = '{"name": <tool>, "arguments": {...}}'
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or set(call) - {"name", "arguments"}:
        return _fail(ErrorKind.BAD_CALL, f"a call is {layout}")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return _fail(ErrorKind.BAD_CALL, f"a call is {layout}; arguments must be an object")
    name = call["name"]
    if name not in tools:
        return _fail(ErrorKind.UNKNOWN_TOOL, f"no tool {_echo(name)}; tools: {', '.join(tools)}")
    spec = tools[name]
    known = {p.name: p for p in spec.params}
    for key in arguments:
        if key not in known:
            return _fail(ErrorKind.UNKNOWN_ARGUMENT, f"{name} takes no argument {_echo(key)}; "
                         f"its arguments: {', '.join(known) or 'none'}")
    for param in spec.params:
        if param.name not in arguments:
            if param.required:
                return _fail(ErrorKind.MISSING_ARGUMENT, f"{name} needs {param.name!r}")
            continue
        problem = argument_problem(param, arguments[param.name])
        if problem:
            return _fail(ErrorKind.BAD_ARGUMENT, f"{name}: {param.name!r} {problem}")
    return ToolCall(name, dict(arguments))


def argument_problem(param: Any, value: Any) -> str | None:
    """Why `value` is not a well-typed value of `param` (a registry.Param), else None."""
    if param.kind == "box":
        return None if is_finite_box(value) else "must be 4 numbers [x1, y1, x2, y2]"
    if param.kind == "image":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else "must be an image number (1 = the first image)"
    if param.kind == "choice":
        # type() too: JSON true must not pass as 1, nor 90.0 as the angle 90 written differently
        if any(type(value) is type(c) and value == c for c in param.choices):
            return None
        return f"must be one of {', '.join(json.dumps(c) for c in param.choices)}"
    raise ValueError(f"unknown parameter kind {param.kind!r}")  # a registry bug, not model output


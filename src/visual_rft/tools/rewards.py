"""Rewards over a whole tool conversation (TRL signature; the conversation arrives as the `tool_turns`
column, each row's turns as dicts from rl/tool_rollout.py). The task's own verifier scores the final
turn's text; these replace its one-turn `format` and add the optional per-call reward."""

from __future__ import annotations

from typing import Any


def conversation_format(completions: list[str], tool_turns: list[list[dict[str, Any]]] | None = None,
                        **_: Any) -> list[float | None]:
    """1 when every turn is well formed (think + a call that ran, or think + answer) and the last one is
    the final answer; 0 otherwise (a malformed or failed call, or a rollout cut before its answer)."""
    if tool_turns is None:
        return [None] * len(completions)
    return [float(bool(turns) and all(t["well_formed"] for t in turns)
                  and turns[-1]["call"] is None and turns[-1]["error"] is None) for turns in tool_turns]


def tool_calls_ok(completions: list[str], tool_turns: list[list[dict[str, Any]]] | None = None,
                  **_: Any) -> list[float | None]:
    """The share of the conversation's tool calls that ran (parsed and executed without an error);
    0 without calls, so with a positive weight it pays for calls that work."""
    if tool_turns is None:
        return [None] * len(completions)
    out = []
    for turns in tool_turns:
        calls = [t for t in turns if t["result"] is not None]
        out.append(sum(t["error"] is None for t in calls) / len(calls) if calls else 0.0)
    return out


TOOL_REWARDS = {"format": conversation_format, "tool_calls_ok": tool_calls_ok}

"""Reward registry: config names -> reward functions, plus explicit `module:function` user code.

Every reward has the TRL signature `f(completions, **columns) -> list[float | None]` (None = not
applicable to that row). The task's `mode` (strict / visual_rft) and `thinking` (on / off) are bound here, once, so the trainer
and `eval` call the very same function objects and the metric cannot drift from the reward.
A reward returns only numbers, so a parse failure (0 reward) and a wrong answer (0 reward) look
alike to it; scoring therefore also runs the task's own parser, once, and reports which completions
it could not parse (the trainer's parse_failure_rate).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

RewardFn = Callable[..., list]

TASK_MODULES = {
    "classification": "visual_rft.tasks.classification",
    "detection": "visual_rft.tasks.detection",
    "grounding": "visual_rft.tasks.grounding",
}


def task_module(task: str) -> ModuleType:
    if task not in TASK_MODULES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[task])


def task_parser(task: str, mode: str) -> Callable[..., Any]:
    """The task's `parse_answer` with the reward mode bound: (completion, **columns) -> answer, None if unparsable."""
    return functools.partial(task_module(task).parse_answer, mode=mode)


def _load_user_function(spec: str) -> RewardFn:
    """Import `package.module:function` — the only way user code enters a run (never eval)."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward '{spec}': cannot import {attr!r} from module {module_name!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"reward '{spec}' is not callable")
    return fn


def _bind_settings(fn: RewardFn, **settings: str) -> RewardFn:
    """`fn` with the task settings it takes (mode, thinking) bound; the others it never sees."""
    parameters = inspect.signature(fn).parameters
    taken = {k: v for k, v in settings.items() if k in parameters}
    if not taken:
        return fn

    def bound(completions: list[str], **columns: Any) -> list:
        return fn(completions, **taken, **columns)

    bound.__name__ = getattr(fn, "__name__", "reward")
    return bound


@dataclass
class Scores:
    """What scoring one batch of completions found, one entry per completion in each list."""

    components: dict[str, list[float]]  # per reward name; None (not applicable) and non-finite count as 0
    applicable: list[bool]  # some reward returned a value (not None): GRPO's grpo.unscorable reads it
    parse_failed: list[bool]  # the task's parser found no answer (parse_answer gave None)


@dataclass
class RewardSet:
    """The configured reward components of a run, their weights, and the task's answer parser."""

    names: list[str]
    functions: list[RewardFn]
    weights: list[float]
    parse: Callable[..., Any]  # the task's parse_answer with its mode bound: (completion, **columns) -> answer | None

    def score(self, completions: list[str], columns: dict[str, list]) -> dict[str, list[float]]:
        """Score every component; None (not applicable) and non-finite values count as 0."""
        return self._components(completions, columns)[0]

    def score_all(self, completions: list[str], columns: dict[str, list]) -> Scores:
        """Every component's scores, which completions any reward applied to, and which ones the
        task's parser could not parse (each row's columns passed to it as to the rewards)."""
        components, applicable = self._components(completions, columns)
        rows = ({key: values[i] for key, values in columns.items()} for i in range(len(completions)))
        parse_failed = [self.parse(text, **row) is None for text, row in zip(completions, rows)]
        return Scores(components, applicable, parse_failed)

    def _components(self, completions: list[str],
                    columns: dict[str, list]) -> tuple[dict[str, list[float]], list[bool]]:
        """Each component's scores, and for each completion whether any reward returned a value."""
        components, applicable = {}, [False] * len(completions)
        for name, fn in zip(self.names, self.functions):
            values = fn(completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
            components[name] = [float(v) if v is not None and math.isfinite(v) else 0.0 for v in values]
            applicable = [seen or v is not None for seen, v in zip(applicable, values)]
        return components, applicable

    def total(self, scores: dict[str, list[float]]) -> list[float]:
        n = len(next(iter(scores.values())))
        return [sum(w * scores[name][i] for name, w in zip(self.names, self.weights)) for i in range(n)]


def task_rewards(task: Any, names: list[str] | None = None, tools: Any = None) -> RewardSet:
    """The rewards of a TaskConfig: task.rewards (or `names`), weighted, with its mode and thinking.
    With `tools` (a ToolsConfig that is enabled) completions are tool conversations: `format` is the
    whole conversation's (tools/rewards.py) and tools.call_reward > 0 adds tool_calls_ok at that weight
    (`names` given: every name given, tool_calls_ok included, at weight 1)."""
    weights = (list(task.reward_weights) if task.reward_weights else None) if names is None else None
    names = list(names if names is not None else task.rewards)
    extra = None
    if tools is not None and tools.enabled:
        from visual_rft.tools.rewards import TOOL_REWARDS

        extra = TOOL_REWARDS
        if tools.call_reward > 0 and "tool_calls_ok" not in names:
            weights = (weights or [1.0] * len(names)) + [tools.call_reward]
            names.append("tool_calls_ok")
    return resolve_rewards(task.name, names, task.mode, weights, thinking=task.thinking, extra=extra)


def resolve_rewards(task: str, names: list[str], mode: str, weights: list[float] | None = None, *,
                    thinking: str = "on", extra: dict[str, RewardFn] | None = None) -> RewardSet:
    """Look up each name in the task's registry (or import `module:function`); fail early on unknowns.
    `mode` (and `thinking`, on / off) is bound into every function that takes it. `extra`: rewards
    that replace or join the task's own under their names (tool conversations)."""
    registry: dict[str, RewardFn] = {**task_module(task).REWARDS, **(extra or {})}
    functions = []
    for name in names:
        if ":" in name:
            functions.append(_bind_settings(_load_user_function(name), mode=mode, thinking=thinking))
        elif name in registry:
            functions.append(_bind_settings(registry[name], mode=mode, thinking=thinking))
        else:
            raise ValueError(f"unknown reward {name!r} for task {task!r}; known: {', '.join(registry)} "
                             "(or give user code as module:function)")
    return RewardSet(list(names), functions, list(weights) if weights else [1.0] * len(names), task_parser(task, mode))

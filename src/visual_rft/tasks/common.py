"""What the task verifiers share: the two reward modes, the format reward, answer extraction.

Modes:
- "strict" (default): our semantics; each task module documents the original quirk it fixes.
- "visual_rft": the public Visual-RFT release to the letter (/work/shared/VISUAL_RFT_REWARDS.md),
  without its math_verify pass. Where the original would return NaN or raise, we return 0.0, as
  its own `except Exception` handler does.

Every reward must stay fast on adversarial model output. Two of the original's regexes backtrack
quadratically (`<answer>(.*?)</answer>` over many unclosed `<answer>`s, and the format regex over
many `</think><answer>` pairs), so this module reproduces their exact match semantics with linear
`str.find` scans instead. Strict mode additionally refuses to parse more than MAX_PARSE_CHARS.
"""

from __future__ import annotations

import re
from typing import Any

MODES = ("strict", "visual_rft")

# A real answer (even 100 boxes) is a few KB; longer strict-mode text is a parse failure, which
# bounds the cost of every downstream json/regex step.
MAX_PARSE_CHARS = 100_000

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# `\s` on str patterns is Unicode whitespace (NBSP, U+3000 ...), the same set as str.isspace().
_WHITESPACE_RUN = re.compile(r"\s*")


def check_mode(mode: str) -> str:
    """Return `mode` if it is a known reward mode, else raise a ValueError naming the valid ones."""
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def completion_text(completion: Any) -> str:
    """The text of one completion.

    Plain strings are the contract; TRL's conversational form (a list of message dicts) is accepted
    too, taking the last message's content, and anything else (None, numbers) becomes its str() or "",
    so a reward never raises on what the policy produced.
    """
    if isinstance(completion, str):
        return completion
    if completion is None:
        return ""
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    return str(completion)


def column(columns: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    """The per-completion values of an optional column, `default` for every row when it is absent."""
    values = columns.get(name)
    if values is None:
        return [default] * n
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        kind = type(values).__name__
        raise ValueError(f"column {name!r} must be a list with one value per completion, got {kind}")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def required_column(values: Any, name: str, n: int) -> list[Any]:
    """Validate a mandatory column (e.g. `solution`): a data error, so it raises loudly."""
    if values is None:
        raise ValueError(f"this reward needs the {name!r} column")
    return column({name: values}, name, n)


# ---------------------------------------------------------------- answer extraction

def first_answer_oneline(text: str) -> str | None:
    """Exactly `re.search(r"<answer>(.*?)</answer>", text).group(1)` (no DOTALL), in linear time.

    Without DOTALL a match lies on one line, and on a line only its first `<answer>` matters: if it
    has no `</answer>` after it on that line, no later `<answer>` on the line has one either.
    """
    # An `<answer>` must end before the last `</answer>` starts to match: scan no further.
    limit = max(0, text.rfind(ANSWER_CLOSE))
    pos = 0
    while True:
        i = text.find(ANSWER_OPEN, pos, limit)
        if i < 0:
            return None
        start = i + len(ANSWER_OPEN)
        newline = text.find("\n", start)
        line_end = len(text) if newline < 0 else newline
        j = text.find(ANSWER_CLOSE, start, line_end)
        if j >= 0:
            return text[start:j]
        if newline < 0:
            return None
        pos = newline + 1


def first_answer_dotall(text: str) -> str | None:
    """Exactly `re.search(r"<answer>(.*?)</answer>", text, re.DOTALL).group(1)`, in linear time."""
    i = text.find(ANSWER_OPEN)
    if i < 0:
        return None
    start = i + len(ANSWER_OPEN)
    j = text.find(ANSWER_CLOSE, start)
    return None if j < 0 else text[start:j]


def extract_answer(text: str) -> str | None:
    """Strict extraction: the stripped content of the one and only `<answer>…</answer>` block.

    None when the text is over MAX_PARSE_CHARS, or has no, several, unclosed or nested answer
    blocks (an `<answer>` quoted in the think text is a second block: the answer must be
    unambiguous). The content may span lines and may be empty ("" is returned; callers decide).
    """
    if len(text) > MAX_PARSE_CHARS:
        return None
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start = text.index(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.index(ANSWER_CLOSE)
    if end < start:
        return None
    return text[start:end].strip()


def solution_answer(solution: str) -> str:
    """The answer part of a ground-truth solution: its first answer block, or the whole string."""
    text = completion_text(solution)
    found = first_answer_dotall(text)
    return (found if found is not None else text).strip()


# ---------------------------------------------------------------- format reward

def format_ok_visual_rft(text: str) -> bool:
    """Exactly `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)`.

    The regex backtracks over every `</think>`; this scans each one once: the text must start with
    `<think>` and end with `</answer>`, and some `</think>` (after the opening tag) must be followed
    by Unicode whitespace and an `<answer>` that ends before the final `</answer>` begins.
    """
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    last_answer_start = len(text) - len(ANSWER_CLOSE) - len(ANSWER_OPEN)
    p = text.find(THINK_CLOSE, len(THINK_OPEN))
    while 0 <= p:
        q = _WHITESPACE_RUN.match(text, p + len(THINK_CLOSE)).end()
        if q > last_answer_start:
            return False  # later `</think>`s only start later still
        if text.startswith(ANSWER_OPEN, q):
            return True
        p = text.find(THINK_CLOSE, p + 1)
    return False


def format_ok_strict(text: str) -> bool:
    """One `<think>…</think>` then one non-empty `<answer>…</answer>`, only whitespace around and between.

    Fixes of the original: surrounding whitespace (a trailing newline) is forgiven; repeated or
    nested tags, text between the blocks and an empty answer are not.
    """
    s = text.strip()
    if len(s) > MAX_PARSE_CHARS or not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    if any(s.count(tag) != 1 for tag in _TAGS):
        return False
    think_end = s.index(THINK_CLOSE) + len(THINK_CLOSE)
    answer_start = s.index(ANSWER_OPEN)
    if answer_start < think_end or s[think_end:answer_start].strip():
        return False
    return bool(s[answer_start + len(ANSWER_OPEN): -len(ANSWER_CLOSE)].strip())


def format_ok_answer_only(text: str) -> bool:
    """task.thinking=off: one non-empty `<answer>…</answer>` block and nothing else (whitespace around
    it forgiven); no think block, no text before or after. The original release has no such mode,
    so `visual_rft` mode checks the same."""
    s = text.strip()
    if len(s) > MAX_PARSE_CHARS or not (s.startswith(ANSWER_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    if any(s.count(tag) != (1 if tag in (ANSWER_OPEN, ANSWER_CLOSE) else 0) for tag in _TAGS):
        return False
    return bool(s[len(ANSWER_OPEN): -len(ANSWER_CLOSE)].strip())


def format_reward(completions: list[Any], *, mode: str = "strict", thinking: str = "on", **_: Any) -> list[float]:
    """1.0 for a completion in the `<think>…</think><answer>…</answer>` layout (thinking off: the
    answer block alone), else 0.0."""
    if thinking == "off":
        check = format_ok_answer_only
    else:
        check = format_ok_strict if check_mode(mode) == "strict" else format_ok_visual_rft
    return [1.0 if check(completion_text(c)) else 0.0 for c in completions]

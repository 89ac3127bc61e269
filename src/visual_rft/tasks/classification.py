"""Fine-grained classification verifier: `accuracy` and `format` rewards, and the answer parser.

The solution column holds the label, as `<answer>garden phlox</answer>` or bare. An optional
`aliases` column (a list of strings per row, or None) lists other accepted names.

`visual_rft` mode reproduces the original `accuracy_reward` (VISUAL_RFT_REWARDS.md,
"Classification accuracy"): both sides stripped of ASCII spaces and `_`, lower-cased, and a
substring test either way.

`strict` mode (default) fixes these quirks of the original:
- Substring test -> equality: "rose" no longer matches "desert-rose", nor "lily" a "lenten
  lily"-style superstring, nor "roses" "rose"; a list of several classes scores 0.
- Empty answer -> 0: `""` (also `<answer>_</answer>`, a tab) was a substring of every label.
- Missing answer -> 0: without exactly one `<answer>…</answer>` block the original scored the
  whole completion, so a class named anywhere in the think text scored 1. A newline inside the
  answer is fine now (whitespace is collapsed) instead of demoting the answer to the whole text.
- Normalisation is symmetric and fuller (`normalize_label`): Unicode NFKC, casefold, `_` and
  dashes as spaces, whitespace of any kind collapsed (not just ASCII spaces deleted), and
  punctuation around the label (quotes, a final period, markdown `**`) stripped. So
  "Globe Flower" equals "globe-flower", and "garden_phlox." equals "garden phlox". Internal
  apostrophes are kept ("colt's foot" != "colts foot"): give such variants as aliases.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Callable

from .common import (
    check_mode,
    column,
    completion_text,
    extract_answer,
    first_answer_oneline,
    format_reward,
    required_column,
    solution_answer,
)


# `_`, ASCII hyphen-minus, the Unicode hyphens and dashes U+2010..U+2015 and the minus sign U+2212
# all read as a space; str.translate keeps this linear and fast on long text.
_AS_SPACE = str.maketrans({ch: " " for ch in "_-\u2010\u2011\u2012\u2013\u2014\u2015\u2212"})


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalize_label(s: str) -> str:
    """Strict label normalisation shared by the reward and eval's per-class accuracy.

    NFKC (full-width letters become ASCII), casefold, `_`, hyphens and dashes as spaces, surrounding
    punctuation and whitespace removed, inner whitespace collapsed to single spaces.
    """
    s = unicodedata.normalize("NFKC", completion_text(s)).casefold()
    s = s.translate(_AS_SPACE)
    start, end = 0, len(s)
    while start < end and _is_edge_junk(s[start]):
        start += 1
    while end > start and _is_edge_junk(s[end - 1]):
        end -= 1
    return " ".join(s[start:end].split())


def _visual_rft_extract(text: str) -> str:
    """The original's answer: first one-line `<answer>` block stripped, else the whole text stripped."""
    found = first_answer_oneline(text)
    return (found if found is not None else text).strip()


def _visual_rft_normalize(s: str) -> str:
    # The original deletes only ASCII spaces and underscores; tabs, NBSP and hyphens survive.
    return s.replace(" ", "").replace("_", "").lower()


def parse_answer(completion: str, *, mode: str = "strict", **_: Any) -> str | None:
    """The normalised predicted label, or None when there is no usable answer.

    strict: the one answer block, through `normalize_label`; None if the block is missing,
    repeated, or normalises to "". visual_rft: the original's normalised answer string, which is
    never None (it falls back to the whole completion).
    """
    text = completion_text(completion)
    if check_mode(mode) == "visual_rft":
        return _visual_rft_normalize(_visual_rft_extract(text))
    answer = extract_answer(text)
    if answer is None:
        return None
    return normalize_label(answer) or None


def _accepted_labels(solution: str, aliases: Any) -> set[str]:
    """The strict-mode set of labels that count as correct for one row."""
    label = normalize_label(solution_answer(solution))
    if not label:
        raise ValueError(f"classification solution {solution!r} has an empty label")
    if aliases is None:
        aliases = []
    elif isinstance(aliases, str):
        aliases = [aliases]
    extra = {normalize_label(a) for a in aliases if isinstance(a, str)}
    return ({label} | extra) - {""}


def _visual_rft_accuracy(completion: str, solution: str) -> float:
    gt = _visual_rft_normalize(_visual_rft_extract(completion_text(solution)))
    st = _visual_rft_normalize(_visual_rft_extract(completion))
    return 1.0 if gt in st or st in gt else 0.0


def accuracy_reward(
    completions: list[Any], *, solution: list[str] | None = None, mode: str = "strict", **columns: Any
) -> list[float]:
    """1.0 when the answer names the solution's class, else 0.0 (see the module doc for each mode)."""
    check_mode(mode)
    n = len(completions)
    solutions = required_column(solution, "solution", n)
    texts = [completion_text(c) for c in completions]
    if mode == "visual_rft":
        return [_visual_rft_accuracy(t, sol) for t, sol in zip(texts, solutions)]
    aliases = column(columns, "aliases", n)
    rewards = []
    for text, sol, alias in zip(texts, solutions, aliases):
        predicted = parse_answer(text, mode="strict")
        rewards.append(1.0 if predicted is not None and predicted in _accepted_labels(sol, alias) else 0.0)
    return rewards


REWARDS: dict[str, Callable[..., list]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
}

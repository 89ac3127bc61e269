"""Fuzz every reward in both modes: never raise, always finite and in range, fast on hostile input.

Also checks that the linear-time scanners in tasks/common.py agree exactly with the regexes of the
original release that they replace (those regexes backtrack quadratically on hostile text).
"""

import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visual_rft.tasks import classification, common, detection, grounding

MODES = ("strict", "visual_rft")
SOLUTIONS = {
    classification: ["<answer>garden phlox</answer>", "rose"],
    detection: [
        "<answer>[{'Position': [100, 100, 200, 200], 'Confidence': 1}, "
        "{'Position': [300, 300, 400, 400], 'Confidence': 1}]</answer>",
        "<answer>No Objects</answer>",
        "<answer>[]</answer>",
    ],
    grounding: ["<answer> (100,100),(500,500) </answer>"],
}
# (low, high) of every reward, per task and mode
RANGES = {(grounding, "giou", "visual_rft"): (0.0, 2.0)}

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u00a0", "\t", "x", "rose", "_", "-",
    "[", "]", "[[", "]]", "{", "}", "},", ",", "'Position'", "'Confidence'", ": ", "0", "100", "200",
    "0.5", "1", "NaN", "Infinity", "-Infinity", "true", "null", '"', "'", "(", ")", "\u0661", "1000",
    "No Objects", "...", "1e999", "9" * 40,
]
texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
)


def _box(i):
    return "{'Position': [%d, %d, %d, %d], 'Confidence': 0.5}" % (i % 900, i % 700, i % 900 + 50, i % 700 + 60)


ADVERSARIAL = {
    "deep_nesting": "[" * 50000,
    "deep_nesting_in_answer": "<think>x</think><answer>" + "[" * 50000 + "]" * 50000 + "</answer>",
    "deep_objects": "<answer>" + '{"a":' * 50000,
    "megabyte_answer": "<think>t</think><answer>" + "rose " * 200_000 + "</answer>",
    "megabyte_unclosed_answers": "<answer>" * 125_000,
    "megabyte_think_answer_pairs": "<think>" + "</think><answer>" * 62_500,
    "megabyte_newlines": "<answer>x\n" * 100_000,
    "megabyte_paren_digits": "<answer>(" + "1" * 1_000_000 + "</answer>",
    "megabyte_pairs": "<answer>" + "(1,2),(3,4)," * 83_000 + "</answer>",
    "unicode_digits": "<answer>(" + "\u0661" * 5000 + ",1),(\uff12,\uff13)</answer>",
    "nan_infinity": "<think>x</think><answer>[{'Position': [NaN, 0, Infinity, -Infinity], 'Confidence': NaN}, "
    "{'Position': [1e999, 1, 2, 3], 'Confidence': Infinity}]</answer>",
    "huge_ints": "<answer>[{'Position': [" + "9" * 4000 + ", 0, 1, 1], 'Confidence': " + "9" * 400 + "}]</answer>",
    "5000_boxes": "<think>x</think><answer>[" + ", ".join(_box(i) for i in range(5000)) + "]</answer>",
    "5000_boxes_bare": "[" + ", ".join(_box(i) for i in range(5000)),
    "5000_grounding_boxes": "<answer>"
    + ", ".join("(%d,%d),(%d,%d)" % (i, i, i + 5, i + 5) for i in range(5000))
    + "</answer>",
}


def _check(value, task, name, mode):
    low, high = RANGES.get((task, name, mode), (0.0, 1.0))
    assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, (name, mode, value)


def _score_all(text):
    for task, solutions in SOLUTIONS.items():
        for mode in MODES:
            task.parse_answer(text, mode=mode)
            for name, fn in task.REWARDS.items():
                values = fn([text] * len(solutions), solution=solutions, mode=mode, extra=[None] * len(solutions))
                for v in values:
                    _check(v, task, name, mode)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_random_completions_never_raise_and_stay_in_range(text):
    _score_all(text)


@settings(max_examples=100, deadline=None)
@given(texts, texts)
def test_random_solutions_visual_rft_never_raises(text, solution):
    for task in SOLUTIONS:
        for name, fn in task.REWARDS.items():
            _check(fn([text], solution=[solution], mode="visual_rft")[0], task, name, "visual_rft")


@settings(max_examples=100, deadline=None)
@given(texts, texts)
def test_random_solutions_strict_score_or_raise_value_error(text, solution):
    # A malformed ground truth is a data bug: strict mode reports it, and only as a ValueError.
    for task in SOLUTIONS:
        for name, fn in task.REWARDS.items():
            try:
                value = fn([text], solution=[solution], mode="strict")[0]
            except ValueError:
                continue
            _check(value, task, name, "strict")


def _timed(fn):
    """(result, seconds), best of two runs so that a busy CI core does not fail the bound."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[-1] < 0.05:
            break
    return result, min(times)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_are_fast_and_bounded(name):
    text = ADVERSARIAL[name]
    budget = 0.1 + len(text) / 1_000_000  # under 1 ms per KB (0.5 s per MB measured here), plus overhead
    for task, solutions in SOLUTIONS.items():
        for mode in MODES:
            for reward_name, fn in task.REWARDS.items():
                values, elapsed = _timed(lambda: fn([text], solution=solutions[:1], mode=mode))
                _check(values[0], task, reward_name, mode)
                assert elapsed < budget, (task.__name__, reward_name, mode, elapsed)
            _, elapsed = _timed(lambda: task.parse_answer(text, mode=mode))
            assert elapsed < budget, (task.__name__, "parse_answer", mode, elapsed)


def test_strict_mode_refuses_oversized_text_quickly():
    text = ADVERSARIAL["megabyte_answer"]
    assert classification.parse_answer(text) is None
    assert common.format_reward([text]) == [0.0]
    assert common.format_reward([text], mode="visual_rft") == [1.0]


# ---------------------------------------------------------------- linear scanners == original regexes

TAG_TEXT = st.lists(
    st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u00a0", "\u3000", "a", "<", ">"]),
    max_size=20,
).map("".join)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")
ANSWER_DOTALL_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _group(match):
    return match.group(1) if match else None


@settings(max_examples=200, deadline=None)
@given(TAG_TEXT)
def test_linear_scanners_match_the_original_regexes(text):
    assert common.first_answer_oneline(text) == _group(ANSWER_RE.search(text))
    assert common.first_answer_dotall(text) == _group(ANSWER_DOTALL_RE.search(text))
    assert common.format_ok_visual_rft(text) == bool(FORMAT_RE.fullmatch(text))


def test_every_reward_rejects_unknown_modes():
    for task, solutions in SOLUTIONS.items():
        for fn in task.REWARDS.values():
            with pytest.raises(ValueError, match="strict, visual_rft"):
                fn(["x"], solution=solutions[:1], mode="nope")

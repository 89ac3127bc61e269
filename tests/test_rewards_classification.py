"""Classification accuracy and the shared format reward, in both modes, with hand-picked values."""

import pytest

from visual_rft.tasks import classification as cls
from visual_rft.tasks.common import format_reward

SOL = "<answer>garden phlox</answer>"


def acc(completion, solution=SOL, mode="strict", **columns):
    return cls.accuracy_reward([completion], solution=[solution], mode=mode, **columns)[0]


def wrap(answer, think="looks like a flower"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- visual_rft: the original quirks

@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        (wrap("garden phlox"), SOL, 1.0),
        (wrap("Garden_Phlox"), SOL, 1.0),  # spaces and _ removed, lower-cased
        (wrap("rose"), "<answer>desert-rose</answer>", 1.0),  # substring
        (wrap("desert-rose"), "<answer>rose</answer>", 1.0),  # superstring
        (wrap("roses"), "<answer>rose</answer>", 1.0),  # plural
        (wrap("rose, lily, petunia"), "<answer>petunia</answer>", 1.0),  # a list of classes
        (wrap(""), SOL, 1.0),  # "" is a substring of everything
        (wrap("_"), SOL, 1.0),
        (wrap("\t"), SOL, 1.0),  # stripped to ""
        (wrap("globe flower"), "<answer>globe-flower</answer>", 0.0),  # hyphen kept
        (wrap("lily"), SOL, 0.0),
        # a newline inside the answer: the whole completion, think text included, is the answer
        ("<think>maybe garden phlox</think><answer>\nrose</answer>", SOL, 1.0),
        # no tags at all: the whole completion is the answer
        ("I think it is a garden phlox", SOL, 1.0),
        ("garden phlox", "garden phlox", 1.0),  # bare solution label
        # NBSP is not an ASCII space, so it survives the normalisation
        (wrap("garden\u00a0phlox"), SOL, 0.0),
    ],
)
def test_visual_rft_accuracy(completion, solution, expected):
    assert acc(completion, solution, mode="visual_rft") == expected


# ---------------------------------------------------------------- strict

@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        (wrap("garden phlox"), SOL, 1.0),
        (wrap("  Garden_Phlox. "), SOL, 1.0),
        (wrap('"garden-phlox"'), SOL, 1.0),
        (wrap("**Garden Phlox**"), SOL, 1.0),
        (wrap("garden\u00a0phlox"), SOL, 1.0),  # any whitespace collapses
        (wrap("garden\nphlox"), SOL, 1.0),  # a newline inside the answer is fine
        (wrap("ＧＡＲＤＥＮ phlox"), SOL, 1.0),  # full-width letters (NFKC)
        (wrap("globe flower"), "<answer>globe-flower</answer>", 1.0),
        (wrap("rose"), "<answer>desert-rose</answer>", 0.0),
        (wrap("desert-rose"), "<answer>rose</answer>", 0.0),
        (wrap("roses"), "<answer>rose</answer>", 0.0),
        (wrap("rose, lily, petunia"), "<answer>petunia</answer>", 0.0),
        (wrap(""), SOL, 0.0),
        (wrap("_"), SOL, 0.0),
        (wrap("\t"), SOL, 0.0),
        ("<think>maybe garden phlox</think> rose", SOL, 0.0),  # no answer block
        ("I think it is a garden phlox", SOL, 0.0),
        ("<think>x</think><answer>garden phlox", SOL, 0.0),  # unclosed
        (wrap("garden phlox") + "<answer>rose</answer>", SOL, 0.0),  # two answer blocks
        ("<think>say <answer>garden phlox</answer></think><answer>rose</answer>", SOL, 0.0),
        (wrap("garden phlox"), "garden phlox", 1.0),  # bare solution label
        (wrap("colt's foot"), "<answer>colts foot</answer>", 0.0),  # apostrophes kept: use aliases
    ],
)
def test_strict_accuracy(completion, solution, expected):
    assert acc(completion, solution) == expected


def test_strict_is_the_default_mode():
    assert cls.accuracy_reward([wrap("")], solution=[SOL]) == [0.0]


def test_aliases_column():
    sols = ["<answer>colts foot</answer>"] * 3
    outs = [wrap("colt's foot"), wrap("Coltsfoot"), wrap("dandelion")]
    aliases = [["colt's foot", "coltsfoot"]] * 3
    assert cls.accuracy_reward(outs, solution=sols, aliases=aliases) == [1.0, 1.0, 0.0]
    # None per row, a bare string alias, and unknown extra columns are all fine
    assert cls.accuracy_reward(
        outs, solution=sols, aliases=[None, "coltsfoot", None], problem=["q"] * 3, image=[None] * 3
    ) == [0.0, 1.0, 0.0]


def test_normalize_label():
    assert cls.normalize_label("  'Garden_Phlox.' ") == "garden phlox"
    assert cls.normalize_label("Globe-Flower") == "globe flower"
    assert cls.normalize_label("globe\u2013flower") == "globe flower"  # en dash
    assert cls.normalize_label("Bird  of\tparadise!") == "bird of paradise"
    assert cls.normalize_label("...") == ""


def test_parse_answer_both_modes():
    assert cls.parse_answer(wrap(" Garden_Phlox. ")) == "garden phlox"
    assert cls.parse_answer(wrap("")) is None
    assert cls.parse_answer("no tags") is None
    assert cls.parse_answer(wrap("Garden Phlox"), mode="visual_rft") == "gardenphlox"
    assert cls.parse_answer("no tags here", mode="visual_rft") == "notagshere"


def test_bad_mode_and_bad_solution():
    with pytest.raises(ValueError, match="strict.*visual_rft"):
        cls.accuracy_reward([wrap("x")], solution=[SOL], mode="lenient")
    with pytest.raises(ValueError, match="strict.*visual_rft"):
        cls.parse_answer("x", mode="VISUAL_RFT")
    with pytest.raises(ValueError, match="empty label"):
        acc(wrap("x"), "<answer> </answer>")
    with pytest.raises(ValueError, match="solution"):
        cls.accuracy_reward([wrap("x")])
    with pytest.raises(ValueError, match="2 values for 1"):
        cls.accuracy_reward([wrap("x")], solution=[SOL, SOL])


def test_conversational_completions_are_accepted():
    msg = [{"role": "assistant", "content": wrap("garden phlox")}]
    assert cls.accuracy_reward([msg], solution=[SOL]) == [1.0]


# ---------------------------------------------------------------- format reward

@pytest.mark.parametrize(
    "text, visual_rft, strict",
    [
        ("<think>a</think><answer>b</answer>", 1.0, 1.0),
        ("<think>a</think>\n\n<answer>b</answer>", 1.0, 1.0),
        ("<think>a</think>\u00a0\u3000<answer>b</answer>", 1.0, 1.0),  # \s is Unicode
        ("<think>a</think><answer>b</answer>\n", 0.0, 1.0),  # trailing newline
        ("  <think>a</think><answer>b</answer>", 0.0, 1.0),  # leading space
        ("<think>a</think><answer></answer>", 1.0, 0.0),  # empty answer
        ("<think>a</think>x<answer>b</answer>", 0.0, 0.0),  # text between blocks
        ("<THINK>a</THINK><answer>b</answer>", 0.0, 0.0),  # tags are case-sensitive
        ("<think>a\nb</think><answer>c\nd</answer>", 1.0, 1.0),  # DOTALL
        # repeated / nested blocks: the lazy regex runs across tags, strict refuses
        ("<think>a</think><answer>b</answer><think>c</think><answer>d</answer>", 1.0, 0.0),
        ("<think><think>a</think></think><answer>b</answer>", 1.0, 0.0),  # nested
        ("<think>a</think> <answer>b</think><answer>c</answer>", 1.0, 0.0),
        ("<think>a</think><answer>b", 0.0, 0.0),
        ("<answer>b</answer>", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format_reward(text, visual_rft, strict):
    assert format_reward([text], mode="visual_rft") == [visual_rft]
    assert format_reward([text]) == [strict]
    assert cls.REWARDS["format"]([text], solution=["x"], mode="visual_rft") == [visual_rft]


def test_registry_names():
    assert set(cls.REWARDS) == {"accuracy", "format"}

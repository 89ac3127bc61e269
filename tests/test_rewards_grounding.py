"""Grounding giou reward in both modes, with hand-computed values."""

import pytest

from visual_rft.tasks import grounding as gr

SOL = "<answer> (100,100),(500,500) </answer>"


def reward(completion, solution=SOL, mode="strict"):
    return gr.giou_reward([completion], solution=[solution], mode=mode)[0]


def ans(body, think="the red cup"):
    return f"<think>{think}</think><answer>{body}</answer>"


# ---------------------------------------------------------------- visual_rft quirks

@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        (ans("(100,100),(500,500)"), SOL, 2.0),  # exact string
        (ans("( 100 , 100 ) , ( 500 , 500 )"), SOL, 2.0),  # giou 1 + 1
        (ans("(500,500),(100,100)"), SOL, 2.0),  # fully inverted box: exactly 2.0
        (ans("(300,100),(700,500)"), SOL, 1.0 + 1 / 3),  # iou 1/3, enclosing = union
        # two boxes: the box is the two top-left corners (100,100)-(500,500)
        (ans("(100,100),(300,300), (500,500),(900,900)"), SOL, 2.0),
        # no answer tags: the first box anywhere, even in the think text
        ("<think>(100,100),(500,500) is the cup</think> done", SOL, 2.0),
        # Unicode digits go through \d and int()
        (ans("(١٠٠,١٠٠),(٥٠٠,٥٠٠)"), SOL, 2.0),
        (ans("[100,100,500,500]"), SOL, 0.0),  # only (x,y) pairs are seen
        (ans("(100.5,100),(500,500)"), SOL, 0.0),
        (ans("no idea"), SOL, 0.0),
        # a degenerate point: exact string gives 2.0, other spacing only 1.0
        (ans("(100,100),(100,100)"), "<answer> (100,100),(100,100) </answer>", 2.0),
        (ans("(100, 100),(100, 100)"), "<answer> (100,100),(100,100) </answer>", 1.0),
        # an exact string wins even without any box on either side
        (ans("cup"), "<answer>cup</answer>", 2.0),
    ],
)
def test_visual_rft_values(completion, solution, expected):
    assert reward(completion, solution, mode="visual_rft") == pytest.approx(expected)


@pytest.mark.parametrize(
    "body",
    [
        "(1000,1000),(0,0)",  # the original: 7.25 for this ground truth (6.09 in the spec's example)
        "(500,100),(100,900)",  # half inverted: the original gives -0.5
        "(" + "9" * 30 + ",0),(0," + "9" * 30 + ")",  # huge integers: the original gave about -1e24
        "(" + "9" * 400 + ",0),(1,1)",  # beyond float range: the original raised OverflowError
        "(" + "9" * 5000 + ",0),(1,1)",  # beyond int()'s digit limit: ValueError
    ],
)
def test_visual_rft_out_of_range_is_zero(body):
    assert reward(ans(body), mode="visual_rft") == 0.0


# ---------------------------------------------------------------- strict

@pytest.mark.parametrize(
    "completion, expected",
    [
        (ans("(100,100),(500,500)"), 1.0),
        (ans("  ( 100 , 100 ) , ( 500 , 500 )\n"), 1.0),  # spacing does not matter
        (ans("(300,100),(700,500)"), (1 / 3 + 1) / 2),
        (ans("(500,500),(100,100)"), 0.0),  # inverted
        (ans("(100,100),(100,500)"), 0.0),  # degenerate
        (ans("(100,100),(1001,500)"), 0.0),  # outside 0..1000
        (ans("(100,100),(300,300), (500,500),(900,900)"), 0.0),  # two boxes
        (ans("the box is (100,100),(500,500)"), 0.0),  # extra text in the answer
        ("<think>(100,100),(500,500)</think> done", 0.0),  # no answer block
        (ans("(١٠٠,١٠٠),(٥٠٠,٥٠٠)"), 0.0),  # ASCII digits only
        (ans("(0100,100),(500,500)"), 1.0),  # leading zero is still 100
        (ans("[100,100,500,500]"), 0.0),
        (ans("(100,100),(500,500)") + "<answer>(1,1),(2,2)</answer>", 0.0),
    ],
)
def test_strict_values(completion, expected):
    assert reward(completion) == pytest.approx(expected)


def test_strict_far_box_is_small_but_positive():
    sol = "<answer> (0,0),(100,100) </answer>"
    # iou 0, enclosing 1e6, union 2e4: giou -0.98 -> (1 - 0.98) / 2
    assert reward(ans("(900,900),(1000,1000)"), sol) == pytest.approx(0.01)


def test_strict_degenerate_ground_truth_is_allowed():
    sol = "<answer> (100,100),(100,300) </answer>"
    assert reward(ans("(90,100),(110,300)"), sol) == pytest.approx(0.5)  # iou 0, enclosing = union


def test_parse_answer_both_modes():
    assert gr.parse_answer(ans("(100,100),(500,500)")) == (100, 100, 500, 500)
    assert gr.parse_answer(ans("(500,500),(100,100)")) is None
    multi = ans("(100,100),(300,300), (500,500),(900,900)")
    assert gr.parse_answer(multi, mode="visual_rft") == (100, 100, 500, 500)
    assert gr.parse_answer(ans("(500,500),(100,100)"), mode="visual_rft") == (500, 500, 100, 100)
    assert gr.parse_answer(ans("nothing"), mode="visual_rft") is None
    assert gr.parse_answer(ans("(" + "9" * 5000 + ",0),(1,1)"), mode="visual_rft") is None


def test_parse_solution():
    assert gr.parse_solution(SOL) == (100, 100, 500, 500)
    assert gr.parse_solution("(1,2),(3,4)") == (1, 2, 3, 4)
    for bad in ("<answer> nothing </answer>", "<answer> (500,500),(100,100) </answer>", "(0,0),(2000,10)"):
        with pytest.raises(ValueError):
            gr.parse_solution(bad)
    with pytest.raises(ValueError):
        reward(ans("(1,1),(2,2)"), "<answer>cup</answer>")
    assert reward(ans("(1,1),(2,2)"), "<answer>cup</answer>", mode="visual_rft") == 0.0


def test_eval_helpers():
    a, b = (0, 0, 10, 10), (5, 0, 15, 10)
    assert gr.box_intersection(a, b) == 50
    assert gr.box_union(a, b) == 150
    assert gr.box_iou(a, b) == pytest.approx(1 / 3)
    assert gr.box_giou(a, b) == pytest.approx(1 / 3)
    # cIoU over two samples = summed intersections / summed unions
    pairs = [(a, b), (a, a)]
    ciou = sum(gr.box_intersection(p, g) for p, g in pairs) / sum(gr.box_union(p, g) for p, g in pairs)
    assert ciou == pytest.approx(150 / 250)


def test_columns_and_modes():
    out = gr.giou_reward([ans("(100,100),(500,500)")] * 2, solution=[SOL] * 2, problem=["q", "q"], image=[1, 2])
    assert out == [1.0, 1.0]
    with pytest.raises(ValueError, match="strict, visual_rft"):
        gr.giou_reward([ans("x")], solution=[SOL], mode="original")
    assert set(gr.REWARDS) == {"giou", "format"}

"""Detection rewards (iou, confidence) in both modes, with hand-computed values."""

import pytest

from visual_rft.tasks import detection as det


def box(pos, conf):
    return {"Position": pos, "Confidence": conf}


def answer(*entries, think="boxes"):
    body = "[" + ", ".join(str(e) for e in entries) + "]"  # Python repr: single quotes, as the data
    return f"<think>{think}</think><answer>{body}</answer>"


def solution(*positions):
    return "<answer>" + str([box(p, 1) for p in positions]) + "</answer>"


A, B = [0, 0, 10, 10], [20, 20, 30, 30]
SOL_A = solution(A)
NO_OBJECTS = "<answer>No Objects</answer>"


def scores(completion, sol=SOL_A, mode="strict", **columns):
    cols = {k: [v] for k, v in columns.items()}
    iou = det.iou_reward([completion], solution=[sol], mode=mode, **cols)[0]
    conf = det.confidence_reward([completion], solution=[sol], mode=mode, **cols)[0]
    return pytest.approx(iou), pytest.approx(conf)


def test_perfect_single_box_both_modes():
    for mode in ("strict", "visual_rft"):
        assert scores(answer(box(A, 0.9)), mode=mode) == (1.0, 0.9)


def test_miss_rewards_low_confidence():
    for mode in ("strict", "visual_rft"):
        assert scores(answer(box(B, 0.2)), mode=mode) == (0.0, 0.8)


# ---------------------------------------------------------------- visual_rft quirks

def test_visual_rft_dedup_keeps_first_copy_and_its_confidence():
    # [1,2,..] and [1.0,2.0,..] are the same key; the 0.1 copy disappears with its confidence
    comp = answer(box(A, 0.9), box([0.0, 0.0, 10.0, 10.0], 0.1), box(B, 0.3))
    assert scores(comp, mode="visual_rft") == (0.5, (0.9 + 0.7) / 2)
    # strict keeps the duplicate as a false positive: iou 1/3, conf (0.9 + 0.9 + 0.7) / 3
    assert scores(comp) == (1 / 3, 2.5 / 3)


def test_visual_rft_stable_sort_ties_keep_input_order():
    loose, tight = [0, 0, 10, 8], A  # IoU 0.8 and 1.0 with the one ground-truth box
    assert scores(answer(box(loose, 0.5), box(tight, 0.5)), mode="visual_rft") == (0.4, 0.5)
    assert scores(answer(box(tight, 0.5), box(loose, 0.5)), mode="visual_rft") == (0.5, 0.5)


def test_greedy_order_lets_a_confident_loose_box_take_the_match():
    loose, tight = [0, 0, 10, 6], A  # IoU 0.6 and 1.0
    for mode in ("strict", "visual_rft"):
        assert scores(answer(box(loose, 0.9), box(tight, 0.8)), mode=mode) == (0.3, (0.9 + 0.2) / 2)


def test_iou_exactly_half():
    half = [0, 0, 10, 5]  # IoU exactly 0.5 with A
    assert scores(answer(box(half, 0.6)), mode="visual_rft") == (0.0, 0.4)  # needs > 0.5
    assert scores(answer(box(half, 0.6))) == (0.5, 0.6)  # strict: >= 0.5 is a hit


def test_visual_rft_double_bracket_repair():
    comp = "<think>x</think><answer>[[{'Position': [0, 0, 10, 10], 'Confidence': 1}]]</answer>"
    assert scores(comp, mode="visual_rft") == (1.0, 1.0)
    assert scores(comp) == (0.0, 0.0)  # strict: a list of lists is not a box list


def test_visual_rft_truncated_list_repair():
    bare = "[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}, {'Position': [20, 2"
    assert scores(bare, mode="visual_rft") == (1.0, 0.9)
    # with text before it and no closing tag the repair cannot help
    assert scores("<think>x</think><answer>" + bare, mode="visual_rft") == (0.0, 0.0)
    # with the closing tag still there it does
    assert scores("<think>x</think><answer>" + bare + "</answer>", mode="visual_rft") == (1.0, 0.9)
    assert scores("<think>x</think><answer>" + bare + "</answer>") == (0.0, 0.0)  # strict: invalid JSON


def test_visual_rft_missing_final_bracket_drops_last_object():
    comp = (
        "<think>x</think><answer>[{'Position': [20, 20, 30, 30], 'Confidence': 0.4}, "
        "{'Position': [0, 0, 10, 10], 'Confidence': 0.9}</answer>"
    )
    # only the first (missed) box survives the repair
    assert scores(comp, mode="visual_rft") == (0.0, 0.6)


def test_visual_rft_prompt_ellipsis():
    with_bracket = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1}, ...]</answer>"
    without = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1}, ...</answer>"
    assert scores(with_bracket, mode="visual_rft") == (0.0, 0.0)
    assert scores(without, mode="visual_rft") == (1.0, 1.0)


def test_newline_inside_answer():
    comp = "<think>x</think><answer>[\n{'Position': [0, 0, 10, 10], 'Confidence': 0.9}\n]</answer>"
    assert scores(comp, mode="visual_rft") == (0.0, 0.0)
    assert scores(comp) == (1.0, 0.9)  # strict: answers spanning lines parse


def test_no_objects_solution():
    none = "<think>nothing</think><answer>No Objects</answer>"
    assert scores(none, NO_OBJECTS, mode="visual_rft") == (0.0, 0.0)
    assert scores(answer(box(A, 0.2)), NO_OBJECTS, mode="visual_rft") == (0.0, 0.0)
    assert scores(none, NO_OBJECTS) == (1.0, 1.0)
    assert scores("<think>x</think><answer>'no objects'.</answer>", NO_OBJECTS) == (1.0, 1.0)
    assert scores("<think>x</think><answer>[]</answer>", NO_OBJECTS) == (1.0, 1.0)
    assert scores(answer(box(A, 0.2)), NO_OBJECTS) == (0.0, 0.8)
    # "No Objects" when there are objects
    assert scores(none, SOL_A, mode="visual_rft") == (0.0, 0.0)
    assert scores(none, SOL_A) == (0.0, 0.0)


def test_empty_list_solution():
    empty = "<answer>[]</answer>"
    assert scores(answer(box(A, 0.3), box(B, 0.1)), empty, mode="visual_rft") == (0.0, (0.7 + 0.9) / 2)
    assert scores("<think>x</think><answer>[]</answer>", empty, mode="visual_rft") == (0.0, 0.0)
    assert scores("<think>x</think><answer>[]</answer>", empty) == (1.0, 1.0)


def test_visual_rft_confidence_nan_and_non_numeric():
    nan = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': NaN}]</answer>"
    assert scores(nan, mode="visual_rft") == (1.0, 0.0)  # the original's confidence is NaN -> 0
    text = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': 'high'}]</answer>"
    assert scores(text, mode="visual_rft") == (0.0, 0.0)  # a string zeroes both rewards
    true = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': true}]</answer>"
    assert scores(true, mode="visual_rft") == (1.0, 1.0)
    big = "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': 5}]</answer>"
    assert scores(big, mode="visual_rft") == (1.0, 1.0)  # clipped to 1
    for comp in (nan, text, true, big):
        assert scores(comp) == (0.0, 0.0)  # strict: the one entry is invalid -> parse failure


def test_visual_rft_duplicate_ground_truth_counts_in_denominator():
    sol = solution(A, A)
    assert scores(answer(box(A, 1)), sol, mode="visual_rft") == (0.5, 1.0)
    assert scores(answer(box(A, 1)), sol) == (1.0, 1.0)  # strict merges exact duplicates


def test_visual_rft_bad_position_length_and_non_dict():
    three = "<think>x</think><answer>[{'Position': [0, 0, 10], 'Confidence': 1}]</answer>"
    assert scores(three, mode="visual_rft") == (0.0, 0.0)
    assert scores("<think>x</think><answer>[1, 2]</answer>", mode="visual_rft") == (0.0, 0.0)


# ---------------------------------------------------------------- strict rules

def test_strict_invalid_entries_count_but_never_match():
    bad_range = box([0, 0, 1001, 10], 0.9)  # outside qwen2vl 0..1000
    inverted = box([10, 10, 0, 0], 0.9)
    comp = answer(box(A, 0.8), bad_range, inverted)
    assert scores(comp) == (1 / 3, 0.8 / 3)
    assert det.parse_answer(comp) == [((0.0, 0.0, 10.0, 10.0), 0.8)]


def test_strict_nan_infinity_entries_are_invalid():
    comp = (
        "<think>x</think><answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.5}, "
        "{'Position': [0, 0, Infinity, 10], 'Confidence': 0.5}, "
        "{'Position': [20, 20, 30, 30], 'Confidence': NaN}]</answer>"
    )
    assert scores(comp) == (1 / 3, 0.5 / 3)


def test_strict_box_spaces():
    sol = solution([64, 48, 320, 240])
    comp = answer(box([64, 48, 320, 240], 1.0))
    assert scores(comp, sol, box_space="pixels", image_size=(640, 480)) == (1.0, 1.0)
    assert scores(comp, sol, box_space="pixels", image_size=(300, 200)) == (0.0, 0.0)  # off the image
    assert scores(comp, sol, box_space="pixels") == (1.0, 1.0)  # no size: only >= 0 checked
    norm_sol = solution([0.1, 0.1, 0.5, 0.5])
    assert scores(answer(box([0.1, 0.1, 0.5, 0.5], 1.0)), norm_sol, box_space="normalized") == (1.0, 1.0)
    assert scores(answer(box([10, 10, 50, 50], 1.0)), norm_sol, box_space="normalized") == (0.0, 0.0)
    with pytest.raises(ValueError, match="box space"):
        scores(comp, sol, box_space="xywh")


def test_strict_box_cap():
    many = answer(*[box([i, i, i + 5, i + 5], 0.5) for i in range(det.MAX_BOXES + 1)])
    assert det.parse_answer(many) is None
    assert scores(many) == (0.0, 0.0)
    ok = answer(*[box([i, i, i + 5, i + 5], 0.5) for i in range(det.MAX_BOXES)])
    assert len(det.parse_answer(ok)) == det.MAX_BOXES


def test_strict_requires_one_answer_block():
    bare = "[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]"
    assert scores(bare, mode="visual_rft") == (1.0, 0.9)  # the original parses bare JSON
    assert scores(bare) == (0.0, 0.0)
    assert scores(answer(box(A, 0.9)) + "<answer>[]</answer>") == (0.0, 0.0)


def test_strict_double_quoted_json_and_extra_keys():
    comp = '<think>x</think><answer>[{"Position": [0, 0, 10, 10], "Confidence": 0.7, "Label": "cat"}]</answer>'
    assert scores(comp) == (1.0, 0.7)


def test_parse_answer_modes():
    assert det.parse_answer("<think>x</think><answer>No Objects</answer>") == []
    assert det.parse_answer("<think>x</think><answer>No Objects</answer>", mode="visual_rft") is None
    assert det.parse_answer("<think>x</think><answer>[]</answer>", mode="visual_rft") is None
    comp = answer(box(A, 0.9), box([0.0, 0.0, 10.0, 10.0], 0.1))
    assert det.parse_answer(comp, mode="visual_rft") == [((0, 0, 10, 10), 0.9)]
    assert len(det.parse_answer(comp)) == 2
    assert det.parse_answer("garbage") is None


def test_parse_solution_and_matching():
    assert det.parse_solution(NO_OBJECTS) == []
    assert det.parse_solution(solution(A, B, A)) == [(0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0)]
    with pytest.raises(ValueError):
        det.parse_solution("<answer>not boxes</answer>")
    with pytest.raises(ValueError):
        det.parse_solution(solution([10, 0, 0, 10]))
    preds = [((20.0, 20.0, 30.0, 30.0), 0.3), ((0.0, 0.0, 10.0, 10.0), 0.9)]
    assert det.match_predictions(preds, [A, B]) == [(1, 1.0), (0, 1.0)]
    assert det.match_predictions(preds, []) == [(None, 0.0), (None, 0.0)]


def test_malformed_solution_strict_raises_visual_rft_scores_zero():
    comp = answer(box(A, 1))
    with pytest.raises(ValueError):
        scores(comp, "<answer>oops</answer>")
    assert scores(comp, "<answer>oops</answer>", mode="visual_rft") == (0.0, 0.0)


def test_unknown_columns_and_mode():
    out = det.iou_reward([answer(box(A, 1))], solution=[SOL_A], problem=["find cats"], image=[None])
    assert out == [1.0]
    with pytest.raises(ValueError, match="strict, visual_rft"):
        det.iou_reward([answer(box(A, 1))], solution=[SOL_A], mode="paper")


def test_registry_names():
    assert set(det.REWARDS) == {"iou", "confidence", "format"}

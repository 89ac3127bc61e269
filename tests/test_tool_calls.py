"""The tool-call parser on well-formed and hostile turns (the fuzz suite's style), turn classification,
and running parsed calls through the registry (issue 29)."""

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visual_rft.tools.calls import (MAX_CALL_CHARS, MAX_TURN_CHARS, ErrorKind, ToolCall, TurnKind,
                                    classify_turn, parse_call)
from visual_rft.tools.registry import (TOOLS, ToolSettings, execute, respond, select_tools, tool_schema,
                                      tools_prompt)


def call(body, think="<think>I need a closer look.</think>"):
    return f"{think}<tool_call>\n{body}\n</tool_call>"


def test_a_qwen_layout_call_parses():
    turn = classify_turn(call('{"name": "zoom", "arguments": {"box": [120, 340, 260, 480]}}'), TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and turn.well_formed and turn.error is None
    assert turn.call == ToolCall("zoom", {"box": [120, 340, 260, 480]})
    turn = classify_turn(call('{"name": "rotate", "arguments": {"angle": 270, "image": 2}}'), TOOLS)
    assert turn.call == ToolCall("rotate", {"angle": 270, "image": 2})
    # a tool without required arguments may leave "arguments" out
    assert classify_turn(call('{"name": "contrast"}'), TOOLS).call == ToolCall("contrast", {})


def test_final_turns_use_the_answer_format():
    final = classify_turn("<think>It is a seven.</think><answer>7</answer>", TOOLS)
    assert final.kind is TurnKind.FINAL and final.well_formed and final.call is None and final.error is None
    assert not classify_turn("7", TOOLS).well_formed
    assert classify_turn("<answer>7</answer>", TOOLS, thinking="off").well_formed


@pytest.mark.parametrize("text, thinking, ok", [
    (call('{"name": "contrast"}'), "on", True),
    (call('{"name": "contrast"}', think=""), "on", False),  # no think block
    (call('{"name": "contrast"}', think=""), "off", True),
    (call('{"name": "contrast"}'), "off", False),  # thinking is off: the call alone
    (call('{"name": "contrast"}') + " and more", "on", False),  # text after the call
    (call('{"name": "contrast"}', think="<think> </think>"), "on", False),  # empty think
    (call('{"name": "contrast"}', think="<think>a</think>b"), "on", False),  # text between
    ("\n " + call('{"name": "contrast"}') + "\n", "on", True),  # whitespace around is forgiven
])
def test_tool_turn_layout(text, thinking, ok):
    turn = classify_turn(text, TOOLS, thinking=thinking)
    assert turn.kind is TurnKind.TOOL_CALL and turn.call is not None and turn.well_formed is ok


HOSTILE = [
    (call('{"name": "crop", "arguments": {"box": [1, 2, 3, 4]}}') * 2, ErrorKind.SEVERAL_CALLS),
    (call('{"name": "contrast"}') + "<answer>7</answer>", ErrorKind.CALL_WITH_ANSWER),
    ('<tool_call>{"name": "contrast"}', ErrorKind.UNCLOSED),
    ('</tool_call>{"name": "contrast"}<tool_call>', ErrorKind.UNCLOSED),
    ('<tool_call>{"name": "contrast"}</tool_call></tool_call>', ErrorKind.UNCLOSED),
    (call("{name: crop}"), ErrorKind.BAD_JSON),
    (call("{'name': 'contrast'}"), ErrorKind.BAD_JSON),  # a Python literal: json only, never eval
    (call('{"name": "contrast", "name": "crop"}'), ErrorKind.BAD_JSON),  # duplicate key: ambiguous
    (call("__import__('os').system('true')"), ErrorKind.BAD_JSON),
    (call(""), ErrorKind.BAD_JSON),
    (call("[" * 990), ErrorKind.BAD_JSON),  # deep nesting under the size cap
    (call("[1, 2]"), ErrorKind.BAD_CALL),
    (call('{"name": "crop", "box": [1, 2, 3, 4]}'), ErrorKind.BAD_CALL),  # flat: not Qwen's layout
    (call('{"name": "crop", "arguments": [1, 2, 3, 4]}'), ErrorKind.BAD_CALL),
    (call('{"name": 5, "arguments": {}}'), ErrorKind.BAD_CALL),
    (call('{"name": "crop", "arguments": {}, "id": 1}'), ErrorKind.BAD_CALL),
    (call('{"name": "exec", "arguments": {"code": "print(1)"}}'), ErrorKind.UNKNOWN_TOOL),
    (call('{"name": "crop", "arguments": {"box": [1, 2, 3, 4], "scale": 2}}'), ErrorKind.UNKNOWN_ARGUMENT),
    (call('{"name": "crop", "arguments": {}}'), ErrorKind.MISSING_ARGUMENT),
    (call('{"name": "rotate", "arguments": {"image": 1}}'), ErrorKind.MISSING_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": [1, 2, 3]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": ["1", 2, 3, 4]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": [true, 2, 3, 4]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": [NaN, 2, 3, 4]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": [1e999, 2, 3, 4]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "crop", "arguments": {"box": [[1, 2], [3, 4]]}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "rotate", "arguments": {"angle": 45}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "rotate", "arguments": {"angle": 90.0}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "rotate", "arguments": {"angle": "90"}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "flip", "arguments": {"direction": "diagonal"}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "contrast", "arguments": {"image": 0}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "contrast", "arguments": {"image": true}}'), ErrorKind.BAD_ARGUMENT),
    (call('{"name": "contrast", "arguments": {"image": 1.5}}'), ErrorKind.BAD_ARGUMENT),
    (call(" " * MAX_CALL_CHARS + '{"name": "contrast"}' + "x" * MAX_CALL_CHARS), ErrorKind.TOO_LONG),
    (call('{"name": "contrast"}') + "x" * MAX_TURN_CHARS, ErrorKind.TOO_LONG),
]


@pytest.mark.parametrize("text, kind", HOSTILE)
def test_hostile_calls_are_counted_errors(text, kind):
    turn = classify_turn(text, TOOLS)
    assert turn.kind is TurnKind.TOOL_CALL and not turn.well_formed and turn.call is None
    assert turn.error.kind is kind
    assert turn.error.message.startswith(f"error ({kind.value}): ") and len(turn.error.message) < 300


def test_error_messages_name_the_fix_and_quote_little():
    error = parse_call(call(json.dumps({"name": "z" * 500, "arguments": {}})), TOOLS)
    assert "tools: crop, zoom, rotate, flip, contrast" in error.message and "z" * 41 not in error.message
    error = parse_call(call('{"name": "crop", "arguments": {"scale": 2}}'), TOOLS)
    assert "its arguments: box, image" in error.message
    # an echo can never spell a template or image token inside the tool's answer
    for name in ("<|im_end|>\n<|im_start|>system", "<|image_pad|>", "<start_of_turn>user"):
        error = parse_call(call(json.dumps({"name": name, "arguments": {}})), TOOLS)
        assert error.kind is ErrorKind.UNKNOWN_TOOL and not set("<>|\n") & set(error.message.split(";")[0])
    # a run that offers fewer tools parses against those only
    only_rotate = select_tools(["rotate"])
    assert parse_call(call('{"name": "crop", "arguments": {"box": [1, 2, 3, 4]}}'), only_rotate).kind \
        is ErrorKind.UNKNOWN_TOOL


FRAGMENTS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]",
             '"name"', '"arguments"', '"box"', '"crop"', '"zoom"', '"rotate"', '"angle"', '"image"', ": ", ", ",
             "90", "1000", "-1", "1e999", "NaN", "true", "null", '"', "\\", "\n", " ", "\u00a0", "x", "\ud7ff"]
turns = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns)
def test_fuzz_classify_never_raises(text):
    turn = classify_turn(text, TOOLS)
    assert turn.kind in TurnKind
    if turn.kind is TurnKind.TOOL_CALL:
        assert (turn.call is None) != (turn.error is None)
        if turn.error is not None:
            assert turn.error.kind in ErrorKind and len(turn.error.message) < 300 and "|" not in turn.error.message
        else:
            assert turn.call.name in TOOLS


@pytest.mark.parametrize("text", [
    "<tool_call>" * 200_000, "<tool_call>" + "[" * 1_000_000 + "</tool_call>",
    "<tool_call>" + '{"a":' * 200_000, call('{"name": "crop", "arguments": {"box": [' + "9" * 990 + ", 1, 2, 3]}}"),
    "<think>" + "x" * 99_000 + "</think><tool_call>{}</tool_call>",
])
def test_megabyte_turns_are_fast(text):
    start = time.perf_counter()
    turn = classify_turn(text, TOOLS)
    assert turn.error is not None and time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------- execute
def _image(width=20, height=10, color=(0, 0, 0)):
    return Image.new("RGB", (width, height), color)


def test_execute_crop_on_the_named_image():
    first, second = _image(), _image(40, 40, (9, 9, 9))
    second.paste((200, 0, 0), (20, 20, 40, 40))
    result = execute(ToolCall("crop", {"box": [500, 500, 1000, 1000], "image": 2}), [first, second], ToolSettings())
    assert result.error is None and result.image.size == (20, 20)
    assert np.array_equal(np.unique(np.asarray(result.image).reshape(-1, 3), axis=0), [[200, 0, 0]])
    assert result.text == 'image 3: crop {"box": [500, 500, 1000, 1000]} of image 2, 20x20 pixels'


def test_execute_zoom_uses_the_settings_size():
    image = _image(448, 448)
    box = {"box": [0, 0, 62.5, 62.5]}  # 28 x 28 px
    assert execute(ToolCall("zoom", box), [image], ToolSettings()).image.size == (448, 448)  # same budget
    small = ToolSettings(zoom_pixels=56 * 56)
    assert execute(ToolCall("zoom", box), [image], small).image.size == (56, 56)


def test_execute_pixel_boxes_refer_to_the_frame():
    image = _image(20, 10)
    framed = ToolSettings(box_space="pixels", frame=lambda img: (img.width * 2, img.height * 2))
    result = execute(ToolCall("crop", {"box": [6, 4, 18, 10]}), [image], framed)
    assert result.image.size == (6, 3)
    # the same box is out of range for the unframed image (x2 = 18 <= 20, y2 = 10 <= 10: inside; 30 is not)
    assert execute(ToolCall("crop", {"box": [6, 4, 30, 10]}), [image], ToolSettings(box_space="pixels")).error.kind \
        is ErrorKind.BAD_BOX


@pytest.mark.parametrize("tool_call, space, kind", [
    (ToolCall("crop", {"box": [0, 0, 1001, 500]}), "qwen2vl", ErrorKind.BAD_BOX),
    (ToolCall("crop", {"box": [500, 0, 400, 500]}), "qwen2vl", ErrorKind.BAD_BOX),  # inverted
    (ToolCall("zoom", {"box": [-1, 0, 400, 500]}), "qwen2vl", ErrorKind.BAD_BOX),
    (ToolCall("zoom", {"box": [0, 0, 0.5, 1.5]}), "normalized", ErrorKind.BAD_BOX),
    (ToolCall("crop", {"box": [0, 0, 2001, 10]}), "pixels", ErrorKind.BAD_BOX),
    # 2000 x 1 px on the 2000 x 10 image: thinner than 1:100, which the processor could not take
    (ToolCall("crop", {"box": [0, 0, 1000, 5]}), "qwen2vl", ErrorKind.BAD_SIZE),
    # a proper box that covers no whole pixel column (3 .. 3.0000001)
    (ToolCall("zoom", {"box": [3, 0, 3.0000001, 5]}), "pixels", ErrorKind.BAD_SIZE),
    (ToolCall("rotate", {"angle": 90, "image": 2}), "qwen2vl", ErrorKind.BAD_IMAGE),
])
def test_execute_errors(tool_call, space, kind):
    result = execute(tool_call, [_image(2000, 10)], ToolSettings(box_space=space))
    assert result.image is None and result.error.kind is kind and result.text == result.error.message


def test_execute_small_proper_box():
    # 0.1 % of 2000 px is 2 px wide; 0.1 % of 10 px (0.01 px) is covered by one whole pixel row
    result = execute(ToolCall("crop", {"box": [100, 100, 101, 101]}), [_image(2000, 10)], ToolSettings())
    assert result.error is None and result.image.size == (2, 1)


def test_execute_rotate_flip_contrast_results():
    image = Image.fromarray(np.array([[[1] * 3, [2] * 3, [3] * 3], [[4] * 3, [5] * 3, [6] * 3]], dtype=np.uint8))
    rotated = execute(ToolCall("rotate", {"angle": 90}), [image], ToolSettings())
    assert np.asarray(rotated.image)[:, :, 0].tolist() == [[3, 6], [2, 5], [1, 4]]
    assert rotated.text == 'image 2: rotate {"angle": 90} of image 1, 2x3 pixels'
    flipped = execute(ToolCall("flip", {"direction": "vertical", "image": 2}), [image, rotated.image], ToolSettings())
    assert np.asarray(flipped.image)[:, :, 0].tolist() == [[1, 4], [2, 5], [3, 6]]
    assert execute(ToolCall("contrast", {}), [image], ToolSettings()).text == "image 2: contrast of image 1, 3x2 pixels"


def test_respond_runs_the_call_or_answers_its_error():
    image = _image(20, 10)
    ok = respond(classify_turn(call('{"name": "rotate", "arguments": {"angle": 90}}'), TOOLS), [image], ToolSettings())
    assert ok.error is None and ok.image.size == (10, 20)
    bad = respond(classify_turn(call('{"name": "rotate", "arguments": {"angle": 45}}'), TOOLS), [image],
                  ToolSettings())
    assert bad.image is None and bad.error.kind is ErrorKind.BAD_ARGUMENT and bad.text == bad.error.message
    with pytest.raises(ValueError, match="final turn"):
        respond(classify_turn("<think>x</think><answer>7</answer>", TOOLS), [image], ToolSettings())


# ------------------------------------------------------------------------------------- the model's view
def test_tools_prompt_lists_each_schema_in_qwen_layout():
    text = tools_prompt(select_tools(["zoom", "rotate"]), "qwen2vl")
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    schemas = [json.loads(line) for line in listed]
    assert [s["function"]["name"] for s in schemas] == ["zoom", "rotate"]
    zoom = schemas[0]["function"]["parameters"]
    assert zoom["required"] == ["box"] and "0..1000" in zoom["properties"]["box"]["description"]
    assert schemas[1]["function"]["parameters"]["properties"]["angle"]["enum"] == [90, 180, 270]
    assert '<tool_call>\n{"name": <tool-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    assert "pixels of the image" in json.dumps(tool_schema(TOOLS["crop"], "pixels"))


def test_select_tools_refuses_unknown_names():
    with pytest.raises(ValueError, match="available: crop, zoom, rotate, flip, contrast"):
        select_tools(["crop", "python"])
    with pytest.raises(ValueError, match="no tools"):
        select_tools([])

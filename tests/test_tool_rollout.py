"""Multi-turn tool rollouts (issue 29): the loop over a scripted engine, the training batch it makes
(which tokens train, by hand), the conversation rewards and metrics, and the scoring of a batch of
multi-turn, multi-image conversations against a plain forward of each conversation alone, per family."""

import pytest
import torch
from PIL import Image

from visual_rft.config import load_config
from visual_rft.data.record import Record
from visual_rft.models.tiny import make_tiny_model
from visual_rft.rewards import task_rewards
from visual_rft.rl.engines.base import Generation
from visual_rft.rl.rollout import tail_logprobs
from visual_rft.rl.tool_rollout import (ToolRunner, conversation_rollout, run_conversations, summarize_tool_columns,
                                        tool_columns, tool_metric_columns, turn_seed)
from visual_rft.tools.images import rotate
from visual_rft.tools.rewards import conversation_format, tool_calls_ok

CALL = '<think>turned</think><tool_call>\n{"name": "rotate", "arguments": {"angle": 90}}\n</tool_call>'
BAD = '<think>turned</think><tool_call>\n{"name": "rotate", "arguments": {angle: 90}}\n</tool_call>'
ANSWER = "<think>a seven</think><answer>7</answer>"
CUT = "<think>I am still thinking and"


@pytest.fixture(scope="module")
def qwen(one_thread):
    return make_tiny_model(seed=0)


def _runner(processor, max_turns=3):
    cfg = load_config(None, ["task.box_space=qwen2vl", "tools.enabled=true", "tools.names=[rotate,zoom]",
                             f"tools.max_turns={max_turns}"])
    return ToolRunner.from_config(cfg, processor)


class Script:
    """A fake engine: row r of turn t says scripts[conversation][t]; CUT ends without an end token."""

    def __init__(self, tokenizer, scripts, group_size):
        self.tokenizer, self.scripts, self.group_size = tokenizer, scripts, group_size
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls, self.turn_of = [], [0] * len(scripts)

    def __call__(self, inputs, images_per_row, group_size, turn, prompt_rows, row_images):
        self.calls.append((inputs["input_ids"].size(0), list(images_per_row), group_size, turn, list(prompt_rows)))
        live = [i for i, s in enumerate(self.scripts) if len(s) > turn and self._alive(i, turn)]
        rows = []
        for i in live:
            text = self.scripts[i][turn]
            ids = self.tokenizer.encode(text, add_special_tokens=False) + ([] if text == CUT else [self.end])
            rows.append((ids, text))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row, _) in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        return Generation(ids, mask, [t for _, t in rows])

    def _alive(self, i, turn):
        return all(t in (CALL, BAD) for t in self.scripts[i][:turn])


def _run(qwen, scripts, group_size=2, max_turns=3):
    model, processor = qwen
    images = [[Image.new("RGB", (56, 56), (i * 90, 30, 200 - i * 90))] for i in range(len(scripts) // group_size)]
    prompts = [f"What digit is number {i}?" for i in range(len(images))]
    draw = Script(processor.tokenizer, scripts, group_size)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    convs = run_conversations(_runner(processor, max_turns), processor, images, prompts, group_size, draw, [end])
    return convs, draw, images, prompts


SCRIPTS = [[CALL, ANSWER],  # prompt 0: a call, its result, the answer
           [ANSWER],  # prompt 0: the answer at once
           [BAD, CALL, CALL],  # prompt 1: a malformed call, a good one, then a call in the last turn (cut off)
           [CUT]]  # prompt 1: cut at the token limit


def test_the_loop_runs_each_conversation_to_its_end(qwen):
    convs, draw, images, _ = _run(qwen, SCRIPTS)
    # turn 1: one row per prompt, G samples each; later turns: the live conversations, one sample each
    assert draw.calls == [(2, [1, 1], 2, 0, [0, 1]), (2, [2, 1], 1, 1, [0, 1]), (1, [2], 1, 2, [1])]
    assert [len(c.turns) for c in convs] == [2, 1, 3, 1]
    assert [c.truncated for c in convs] == [False, False, True, True]
    first = convs[0]
    assert first.turns[0].call == {"name": "rotate", "arguments": {"angle": 90}} and first.turns[0].error is None
    assert first.turns[0].result.startswith("image 2: rotate") and first.turns[1].result is None
    assert first.final_text == ANSWER
    tool_image = first.conversation.tool_images[0]
    assert tool_image.tobytes() == rotate(images[0][0], 90).tobytes()
    failed = convs[2]
    assert [t.error for t in failed.turns] == ["bad_json", None, None]
    assert failed.turns[0].result.startswith("error (bad_json)") and failed.turns[2].result is None
    assert len(failed.conversation.images) == 2  # the error answered with text only; one rotated image


def test_the_training_batch_trains_exactly_the_generated_tokens(qwen):
    model, processor = qwen
    convs, _, _, prompts = _run(qwen, SCRIPTS)
    records = [Record(Image.new("RGB", (56, 56)), "", "<answer>7</answer>", {"label": "7"}, f"r{i}") for i in range(2)]
    rollout = conversation_rollout(records, prompts, convs, group_size=2, temperature=1.0)
    tail = rollout.completion_ids.size(1)
    for row, conv in enumerate(convs):
        generated = [i for ids in conv.conversation.turns for i in ids]
        assert rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist() == generated
        whole = conv.conversation.input_ids()
        # the tail is the row's last tokens: everything after its prompt, left-filled by prompt tokens
        assert rollout.completion_ids[row].tolist() == whole[-tail:].tolist()
        assert whole.numel() - conv.conversation.prompt_length() <= tail
    assert rollout.sequence_inputs["input_ids"][:, -tail:].equal(rollout.completion_ids)
    assert rollout.records == [records[0]] * 2 + [records[1]] * 2
    assert rollout.completions == [ANSWER, ANSWER, CALL, CUT] and rollout.truncated.tolist() == [0, 0, 1, 1]
    # image tensors: 2 + 1 + 2 + 1 images of 4 merged tokens each (16 patches of 14 px)
    assert rollout.sequence_inputs["image_grid_thw"].size(0) == 6


def test_conversation_rewards_and_metrics(qwen):
    convs, _, _, _ = _run(qwen, SCRIPTS)
    columns = tool_columns(convs)
    assert conversation_format([c.final_text for c in convs], **columns) == [1.0, 1.0, 0.0, 0.0]
    assert tool_calls_ok([c.final_text for c in convs], **columns) == [1.0, 0.0, 0.5, 0.0]
    cfg = load_config(None, ["tools.enabled=true", "tools.call_reward=0.5"])
    rewards = task_rewards(cfg.task, tools=cfg.tools)
    assert rewards.names == ["accuracy", "format", "tool_calls_ok"] and rewards.weights == [1.0, 1.0, 0.5]
    scores = rewards.score([c.final_text for c in convs], {"solution": ["<answer>7</answer>"] * 4, **columns})
    assert scores["accuracy"] == [1.0, 1.0, 0.0, 0.0] and rewards.total(scores) == [2.5, 2.0, 0.25, 0.0]
    assert task_rewards(cfg.task).names == ["accuracy", "format"]  # without tools: the one-turn rewards
    metrics = summarize_tool_columns(tool_metric_columns([c.rows() for c in convs]))
    assert metrics["tool/call_rate"] == 0.5 and metrics["tool/calls_mean"] == 3 / 4
    assert metrics["tool/turns_mean"] == 7 / 4 and metrics["tool/call_error_rate"] == 1 / 3
    assert metrics["tool/errors/bad_json"] == 1 / 3 and metrics["tool/errors/bad_box"] == 0.0


def test_turn_seeds_keep_the_first_turn_and_differ_after():
    assert turn_seed(123, 0) == 123 and len({turn_seed(123, t) for t in range(4)}) == 4
    assert turn_seed(None, 2) is None


def _script_two_conversations(processor):
    """A 2-turn conversation with a tool image, and a one-turn answer, as token ids of the family."""
    from visual_rft.tools.conversation import Conversation

    tokenizer = processor.tokenizer
    ends = [i for i in (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<end_of_turn>",
                                                                      "<end_of_utterance>", "<|user|>"))
            if isinstance(i, int) and i != tokenizer.unk_token_id]
    end = ends[0]
    red, green = Image.new("RGB", (56, 56), (200, 10, 10)), Image.new("RGB", (56, 84), (10, 200, 10))
    grown = Conversation(processor, "What digit?", [red])
    grown.add_model_turn(tokenizer.encode(CALL, add_special_tokens=False) + [end])
    grown.add_tool_result(green, "image 2: zoom")
    grown.add_model_turn(tokenizer.encode(ANSWER, add_special_tokens=False) + [end])
    short = Conversation(processor, "Which handwritten digit is this one?", [green])
    short.add_model_turn(tokenizer.encode(ANSWER, add_special_tokens=False) + [end])
    return [grown, short]


class _Finished:
    def __init__(self, conversation):
        self.conversation, self.truncated, self.final_text, self.turns = conversation, False, "", []


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "smolvlm", "glm4v"])
def test_conversation_logprobs_and_gradients_equal_a_plain_forward(arch, one_thread):
    """The trainer's batch (left-padded conversations, every image, the last T tokens scored) against
    each conversation alone through the model's own logits."""
    torch.manual_seed(0)
    model, processor = make_tiny_model(seed=0, arch=arch)
    model.float().train()
    convs = _script_two_conversations(processor)
    records = [Record(Image.new("RGB", (56, 56)), "", "<answer>7</answer>", {}, "r0")]
    rollout = conversation_rollout(records * 2, ["q", "q"], [_Finished(c) for c in convs], group_size=1,
                                   temperature=0.7)
    batched = tail_logprobs(model, rollout.sequence_inputs, rollout.completion_ids, temperature=0.7)
    mask = rollout.completion_mask.bool()
    (batched * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain_total = 0
    for row, conv in enumerate(convs):
        inputs = conv.model_inputs()
        logits = model(**inputs, use_cache=False).logits[0, :-1].float() / 0.7
        logp = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
        written = conv.loss_mask()[1:].bool()
        ours = batched[row][mask[row]]
        assert ours.numel() == int(written.sum())
        assert (ours - logp[written]).abs().max().item() < 1e-5, arch
        plain_total = plain_total + logp[written].sum()
    plain_total.backward()
    # relative to each tensor's gradient scale, floored at 1e-6 of the largest: a key bias's gradient is
    # 0 in exact arithmetic (softmax ignores it), so its float noise has no scale of its own
    largest = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    worst = max((grads[n] - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-6 * largest)
                for n, p in model.named_parameters() if p.grad is not None and n in grads)
    assert worst < 1e-4, (arch, worst)
    assert len(grads) == len([p for p in model.parameters() if p.grad is not None])

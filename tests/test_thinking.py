"""task.thinking: on (the paper's <think>…</think><answer>…</answer>) or off (No-Thinking RFT, CLS-RL):
the format reward, SFT targets, the instruction check, and a tiny-model run with thinking off."""

import json

import pytest

from visual_rft.cli import main
from visual_rft.config import NO_THINK_INSTRUCTION, ConfigError, load_config
from visual_rft.data.record import Record
from visual_rft.rewards import resolve_rewards
from visual_rft.runlog import read_jsonl
from visual_rft.sft import sft_target

THINK = "<think>a six</think><answer>6</answer>"
ANSWER_ONLY = "<answer>6</answer>"
# (text, thinking on: strict, visual_rft; thinking off: strict, visual_rft), by hand
CASES = [
    (THINK, 1, 1, 0, 0),
    (ANSWER_ONLY, 0, 0, 1, 1),
    ("  <answer>6</answer>\n", 0, 0, 1, 1),  # whitespace around is forgiven
    ("<answer></answer>", 0, 0, 0, 0),  # empty answer
    ("<answer> </answer>", 0, 0, 0, 0),
    ("six <answer>6</answer>", 0, 0, 0, 0),  # text before
    ("<answer>6</answer> because", 0, 0, 0, 0),  # text after
    ("<answer>6</answer><answer>7</answer>", 0, 0, 0, 0),  # two blocks
    ("<answer><think>x</think>6</answer>", 0, 0, 0, 0),  # a think tag inside
    ("<think>a six</think> <answer>6</answer>", 1, 1, 0, 0),
    ("6", 0, 0, 0, 0),
]


@pytest.mark.parametrize("task", ["classification", "detection", "grounding"])
@pytest.mark.parametrize("text, on_strict, on_orig, off_strict, off_orig", CASES)
def test_the_format_reward_by_thinking_and_mode(task, text, on_strict, on_orig, off_strict, off_orig):
    got = []
    for thinking in ("on", "off"):
        for mode in ("strict", "visual_rft"):
            rewards = resolve_rewards(task, ["format"], mode, thinking=thinking)
            got.append(rewards.score([text], {"solution": ["<answer>6</answer>"]})["format"][0])
    assert got == [on_strict, on_orig, off_strict, off_orig]


def test_accuracy_is_the_same_with_thinking_off():
    on = resolve_rewards("classification", ["accuracy"], "strict")
    off = resolve_rewards("classification", ["accuracy"], "strict", thinking="off")
    texts, columns = [THINK, ANSWER_ONLY, "<answer>7</answer>"], {"solution": ["<answer>6</answer>"] * 3}
    assert on.score(texts, columns)["accuracy"] == off.score(texts, columns)["accuracy"] == [1.0, 1.0, 0.0]


def test_sft_targets_drop_the_think_part_with_thinking_off():
    record = Record(image="x.png", problem="", solution="<answer>7</answer>")
    assert sft_target(record, "I see a seven.") == "<think>I see a seven.</think><answer>7</answer>"
    assert sft_target(record, "I see a seven.", "off") == "<answer>7</answer>"


def test_thinking_off_with_an_instruction_asking_for_think_names_the_fix():
    with pytest.raises(ConfigError, match="task.thinking=off but task.instruction asks for a <think> block"):
        load_config("configs/demo.yaml", ["task.thinking=off"])
    cfg = load_config("configs/demo.yaml", ["task.thinking=off", f"task.instruction={NO_THINK_INSTRUCTION}"])
    assert cfg.task.thinking == "off"


def test_score_says_which_format_it_held_completions_to(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"completion": c, "solution": "<answer>6</answer>"}) + "\n"
                           for c in (THINK, ANSWER_ONLY)))
    assert main(["score", "--thinking", "off", str(src), str(tmp_path / "out.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == 0.5 and summary["settings"]["thinking"] == "off"
    assert [r["format"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0.0, 1.0]


def test_a_tiny_model_trained_with_thinking_off_answers_without_a_think_block(tiny_model_dir, digits_jsonl, tmp_path,
                                                                             one_thread):
    """SFT with thinking off, then GRPO from it: its sampled completions carry no think block, the
    format reward holds them to the answer-only layout, eval reports the mode."""
    common = [f"data.train={digits_jsonl}", f"data.eval={digits_jsonl}", "task.thinking=off",
              f"task.instruction={NO_THINK_INSTRUCTION}", "output.progress=false", "eval.steps=-1"]
    sft_out, grpo_out, eval_out = tmp_path / "sft", tmp_path / "grpo", tmp_path / "eval"
    assert main(["sft", "configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", f"output.dir={sft_out}",
                 "sft.max_steps=60", "sft.batch_size=10", "sft.optim.learning_rate=3e-3", *common]) == 0
    sft_model = sft_out / "checkpoint-60" / "model"
    assert main(["train", "configs/demo.yaml", f"model.name_or_path={sft_model}", f"output.dir={grpo_out}",
                 "grpo.max_steps=2", "grpo.num_generations=4", "grpo.per_device_batch_size=2",
                 "grpo.max_completion_length=12", "output.sample_steps=1", *common]) == 0
    completions = [r["completion"] for r in read_jsonl(grpo_out / "rollouts.jsonl")]
    assert completions and not any("<think>" in c for c in completions)
    rows = read_jsonl(grpo_out / "metrics.jsonl")
    assert all(r["reward/format_mean"] > 0.5 for r in rows)  # the answer-only layout, rewarded
    assert all(0 < r["completion_length"] < 12 for r in rows)  # logged: a few tokens, no reasoning
    assert main(["eval", "--out", str(eval_out), "configs/demo.yaml", f"model.name_or_path={sft_model}",
                 *common]) == 0
    metrics = json.loads((eval_out / "metrics.json").read_text())
    assert metrics["thinking"] == "off" and metrics["format_rate"] > 0.5

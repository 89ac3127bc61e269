"""GRPO with tools (issue 29): a trainer step over scripted tool calls (the conversation rewards, the
metrics, the gradient of exactly the tokens the model wrote), and `visual-rft train` with tools on the
embedded tool task from the command line."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from visual_rft.config import ConfigError, load_config
from visual_rft.report.build import write_report
from visual_rft.report.images import render_image
from visual_rft.rewards import task_rewards
from visual_rft.rl.engines.base import Generation
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runtime import load_split
from visual_rft.tools.images import rotate

CALL = '<think>turned</think><tool_call>\n{"name": "rotate", "arguments": {"angle": 90}}\n</tool_call>'


class ScriptedEngine:
    """First turn: even samples call rotate, odd ones answer with the record's own label; later turns
    answer with the label (so rewards differ only by format within a group, never at random)."""

    name, syncs_weights = "scripted", False

    def __init__(self, tokenizer):
        self.tokenizer, self.end = tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.requests = []

    def sync(self, model):
        return False

    def after_rollout(self):
        pass

    def hold(self, model):
        return contextlib.nullcontext()

    def generate(self, model, request):
        self.requests.append(request)
        texts = []
        for record in request.records:
            answer = f"<think>a digit</think><answer>{record.fields['label']}</answer>"
            texts += [CALL if j % 2 == 0 else answer for j in range(request.group_size)] if request.group_size > 1 \
                else [answer]
        rows = [self.tokenizer.encode(t, add_special_tokens=False) + [self.end] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return Generation(ids, mask, texts)


@pytest.fixture
def tool_cfg(tiny_model_dir, tmp_path):
    def make(*overrides):
        return load_config("configs/demo.yaml", [
            f"model.name_or_path={tiny_model_dir}", "data.train=embedded:mnist_rotated", "data.limit=20",
            "data.image_size=null", "tools.enabled=true", "tools.names=[rotate]", f"output.dir={tmp_path / 'run'}",
            "output.progress=false", "grpo.num_generations=4", "grpo.per_device_batch_size=2",
            "grpo.max_completion_length=8", "grpo.max_steps=1", "output.sample_steps=1", *overrides])
    return make


def test_a_step_over_tool_calls_scores_whole_conversations(tool_cfg, one_thread):
    cfg = tool_cfg("tools.call_reward=0.5")
    trainer = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task, tools=cfg.tools))
    trainer.rollout_engine = ScriptedEngine(trainer.processor.tokenizer)
    metrics, rollouts = trainer.train_step(0)
    # 2 prompts x 4 samples; samples 0 and 2 call rotate, then answer: 3 turns in 2 conversations of 4
    assert metrics["tool/call_rate"] == 0.5 and metrics["tool/turns_mean"] == 1.5
    assert metrics["tool/call_error_rate"] == 0.0 and metrics["truncated_frac"] == 0.0
    assert metrics["reward/accuracy_mean"] == 1.0 and metrics["reward/format_mean"] == 1.0
    assert metrics["reward/tool_calls_ok_mean"] == 0.5  # the calls pay 0.5 x 1; direct answers 0
    requests = trainer.rollout_engine.requests
    assert [r.group_size for r in requests] == [4, 1] and requests[1].images_per_row == [2, 2, 2, 2]
    assert [len(r.records) for r in requests] == [2, 4]
    rollout = rollouts[0]
    # advantages: a call's conversation (reward 2.5) above a direct answer (2.0) in every group
    assert (rollout.advantages.view(2, 4)[:, 0::2] > 0).all() and (rollout.advantages.view(2, 4)[:, 1::2] < 0).all()
    generated = [sum(len(ids) for ids in c.conversation.turns) for c in rollout.conversations]
    assert rollout.completion_mask.sum(1).tolist() == generated
    assert metrics["completion_length"] == sum(generated) / 8
    assert metrics["grad_norm"] > 0
    # the sampled rows keep every turn and the images the tools made (2 calls in each of the 2 groups); the
    # report shows them beside the call
    trainer._log(1, metrics, rollouts)
    rows = [json.loads(line) for line in (trainer.out / "rollouts.jsonl").read_text().splitlines()]
    called = rows[0]["turns"][0]
    assert called["call"] == {"name": "rotate", "arguments": {"angle": 90}}
    saved = Image.open(trainer.out / called["image"])
    first = rollout.conversations[0].conversation
    assert saved.tobytes() == rotate(first.images[0], 90).tobytes() == first.tool_images[0].tobytes()
    assert "image" not in rows[1]["turns"][0]  # a direct answer: no tool image
    html = write_report([trainer.out], trainer.out / "report.html").read_text()
    assert html.count('class="tool-image"') == 4 and render_image(trainer.out / called["image"]) in html


def test_tool_runs_refuse_what_they_cannot_do(tool_cfg):
    with pytest.raises(ConfigError, match="tools.max_turns must be >= 2"):
        tool_cfg("tools.max_turns=1")
    with pytest.raises(ConfigError, match=r"unknown tool\(s\) \['magnify'\]"):
        tool_cfg("tools.names=[rotate,magnify]")


def test_train_with_tools_from_the_command_line(tool_cfg, tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    args = ["configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", "data.train=embedded:mnist_rotated",
            "data.limit=8", "data.image_size=null", "tools.enabled=true", "tools.names=[rotate]",
            f"output.dir={out}", "output.progress=false", "grpo.num_generations=2", "grpo.per_device_batch_size=2",
            "grpo.max_completion_length=6", "grpo.max_steps=2", "output.sample_steps=1"]
    done = subprocess.run([sys.executable, "-m", "visual_rft.cli", "train", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["tool/turns_mean"] >= 1.0 and "reward/format_mean" in m for m in metrics)
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert samples and all(len(s["turns"]) >= 1 and s["turns"][-1]["text"] == s["completion"] for s in samples)
    assert "tool conversations differ per sample" in done.stderr  # the packed shortcut's fallback, said once
    saved = load_config(out / "config.yaml")
    assert saved.tools.enabled and saved.tools.names == ["rotate"]
    # the run folder evaluates with tools as any model does (task.box_space=auto read from its model/)
    evaluated = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "visual_rft.cli", "eval", *args[:1], f"model.name_or_path={out}",
                           "data.eval=embedded:mnist_rotated", "data.limit=3", "data.image_size=null",
                           "tools.enabled=true", "tools.names=[rotate]", "eval.max_new_tokens=6",
                           f"output.dir={evaluated}", "output.progress=false"], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and 0.0 <= metrics["tool/call_rate"] <= 1.0
    assert load_config(evaluated / "config.yaml").model.name_or_path == str(out / "checkpoint-2" / "model")



def test_the_shipped_tools_config_runs_sft_then_grpo_with_its_own_settings(tiny_model_dir, tmp_path, one_thread):
    """configs/tools_digits.yaml as shipped (only the model, folders, record count and step counts
    changed): one SFT step on its trajectories, then one GRPO step from that checkpoint, each run with
    the values the file sets."""
    from visual_rft.sft import train_sft

    config = "configs/tools_digits.yaml"
    keep = ["data.limit=8", "output.progress=false", "eval.steps=-1"]
    sft_cfg = load_config(config, [f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path / 'sft'}",
                                   "sft.max_steps=1", *keep])
    records = load_split(sft_cfg)
    assert {r.fields["rotation"] for r in records} <= {0, 90, 180, 270} and all("tool_calls" in r.fields
                                                                                for r in records)
    sft_run = train_sft(sft_cfg, None)
    assert json.loads((sft_run / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0

    cfg = load_config(config, [f"model.name_or_path={next(sft_run.glob('checkpoint-*')) / 'model'}",
                               f"output.dir={tmp_path / 'grpo'}", "grpo.max_steps=1", *keep])
    trainer = GRPOTrainer(cfg, load_split(cfg), task_rewards(cfg.task, tools=cfg.tools))
    assert list(trainer.tools.tools) == ["rotate"] and trainer.tools.max_turns == 3
    assert '"name": "rotate"' in trainer.tools.system and '"name": "zoom"' not in trainer.tools.system
    assert trainer.rewards.names == ["accuracy", "format", "tool_calls_ok"] and trainer.rewards.weights == [1, 1, 0.1]
    metrics, rollouts = trainer.train_step(0)
    # 4 prompts x G=8 conversations, each turn at most 96 new tokens, at most 3 turns
    assert [len(r.conversations) for r in rollouts] == [32]
    turns = [t for c in rollouts[0].conversations for t in c.turns]
    assert max(t.tokens for t in turns) <= 96 and 1 <= metrics["tool/turns_mean"] <= 3
    assert trainer.optimizer.param_groups[0]["lr"] == 3e-4 and "reward/tool_calls_ok_mean" in metrics


def test_tools_zoom_pixels_sizes_the_zoom_the_model_sees(tiny_model_dir):
    """tools.zoom_pixels from the config reaches the call: the zoomed image has that area (sides
    multiples of 28), whatever the size of the image zoomed into."""
    from visual_rft.runtime import load_policy
    from visual_rft.rl.tool_rollout import ToolRunner

    call = '<think>look</think><tool_call>\n{"name": "zoom", "arguments": {"box": [0, 0, 500, 500]}}\n</tool_call>'
    cfg = load_config("configs/demo.yaml", [f"model.name_or_path={tiny_model_dir}", "tools.enabled=true",
                                            "tools.names=[zoom]", "tools.zoom_pixels=12544", "task.box_space=qwen2vl"])
    _, processor = load_policy(cfg, torch.device("cpu"))
    end = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def zoomed(runner):
        conv = runner.start(processor, "What digit?", [Image.new("RGB", (448, 448), (40, 40, 40))])
        conv.add_model_turn(processor.tokenizer.encode(call, add_special_tokens=False) + end)
        assert runner.answer(conv, call).error is None
        return conv.tool_images[0].size

    assert zoomed(ToolRunner.from_config(cfg, processor)) == (112, 112)  # 112 x 112 = 12544 pixels
    unset = load_config("configs/demo.yaml", [f"model.name_or_path={tiny_model_dir}", "tools.enabled=true",
                                              "tools.names=[zoom]", "task.box_space=qwen2vl"])
    assert zoomed(ToolRunner.from_config(unset, processor)) == (448, 448)  # default: the source image's area

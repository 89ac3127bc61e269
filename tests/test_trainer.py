"""The GRPO trainer on the tiny model: learning, the KL term, checkpoints and resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from visual_rft.checkpoint import latest_checkpoint, list_checkpoints
from visual_rft.rewards import resolve_rewards
from visual_rft.rl.trainer import GRPOTrainer, train_grpo
from visual_rft.runlog import read_jsonl
from visual_rft.runtime import load_split


def _weights(ckpt):
    return load_file(str(next((ckpt / "model").glob("*.safetensors"))))


def test_reward_rises_on_a_learnable_toy(small_cfg):
    cfg = small_cfg("task.rewards=[toy_rewards:sevens]", "grpo.max_steps=12", "grpo.learning_rate=1e-2",
                    "grpo.per_device_batch_size=4", "grpo.num_generations=8", "output.save_steps=0")
    train_grpo(cfg)
    rows = read_jsonl(f"{cfg.output.dir}/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[0]["reward/total_mean"], sum(r["reward/total_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)


def test_metrics_cover_every_component_and_phase(small_cfg):
    cfg = small_cfg("grpo.beta=0.04", "grpo.learning_rate=1e-2", "output.sample_steps=1",
                    "task.rewards=[accuracy, format, toy_rewards:text_length]")
    train_grpo(cfg)
    rows = read_jsonl(f"{cfg.output.dir}/metrics.jsonl")
    for key in ("reward/accuracy_mean", "reward/format_mean", "reward/toy_rewards:text_length_mean",
                "reward/accuracy_std", "reward/group_std", "kl", "clip_frac", "completion_length",
                "parse_failure_rate", "loss", "grad_norm", "lr", "time/rollout", "time/reward", "time/reference",
                "time/update"):
        assert key in rows[0], key
    # the policy starts equal to the reference: the first update sees KL exactly 0, the next does not
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0
    assert rows[0]["clip_frac"] == 0.0  # one update per rollout: the ratio is exactly 1
    samples = read_jsonl(f"{cfg.output.dir}/rollouts.jsonl")
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 2 * 2 * 4
    assert {"completion", "advantage", "accuracy", "format", "solution", "prompt"} <= samples[0].keys()


def test_several_updates_per_rollout_clip_against_the_sampling_policy(small_cfg):
    cfg = small_cfg("grpo.num_iterations=3", "grpo.learning_rate=5e-2", "grpo.epsilon=0.01", "grpo.max_steps=1",
                    "task.rewards=[toy_rewards:text_length]")
    train_grpo(cfg)
    (row,) = read_jsonl(f"{cfg.output.dir}/metrics.jsonl")
    assert "time/old_policy" in row
    assert row["clip_frac"] > 0.0  # the third update of a 1% trust region has moved past the clip


def test_beta_zero_loads_no_reference(small_cfg):
    cfg = small_cfg("grpo.beta=0")
    rewards = resolve_rewards("classification", ["accuracy", "format"], "strict")
    trainer = GRPOTrainer(cfg, load_split(cfg), rewards)
    assert trainer.ref_model is None


def test_checkpoints_are_complete_and_resume_is_exact(small_cfg, tmp_path):
    cfg = small_cfg("grpo.max_steps=4", "output.save_steps=2", "output.save_total_limit=2",
                    "grpo.learning_rate=1e-3", "grpo.beta=0.04")
    out = train_grpo(cfg)
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "config.yaml", "trainer_state.json"):
        assert (ckpts[0] / name).is_file()
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["step"] == 2

    # a second run that stopped after step 2 resumes from its checkpoint and ends bitwise identical
    import shutil
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(ckpts[0], resumed_dir / "checkpoint-2")
    cfg.output.dir = str(resumed_dir)
    train_grpo(cfg, resume=True)
    final, reference = _weights(latest_checkpoint(resumed_dir)), _weights(ckpts[1])
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    assert [r["step"] for r in read_jsonl(resumed_dir / "metrics.jsonl")] == [3, 4]


def test_unknown_reward_fails_before_any_model_loads(small_cfg):
    cfg = small_cfg("task.rewards=[acuracy]", "model.name_or_path=/does/not/exist")
    with pytest.raises(ValueError, match="unknown reward 'acuracy'.*known: accuracy, format"):
        train_grpo(cfg)


def test_reward_returning_wrong_length_is_named(small_cfg):
    cfg = small_cfg("task.rewards=[toy_rewards:wrong_length]")
    with pytest.raises(ValueError, match="returned 1 values for 8 completions"):
        train_grpo(cfg)

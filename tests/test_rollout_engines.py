"""Choosing the rollout engine (grpo.rollout) where vLLM is not installed (the main test venv)."""

import importlib.util

import pytest

from visual_rft.config import ConfigError
from visual_rft.rl.engines.hf import HFRolloutEngine
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.rewards import task_rewards
from visual_rft.runtime import load_split

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                reason="vLLM is installed here: tests/test_vllm.py covers it")


def test_vllm_without_vllm_stops_naming_the_install(small_cfg):
    cfg = small_cfg("grpo.rollout=vllm")
    with pytest.raises(ConfigError, match=r"grpo.rollout=vllm: vLLM is not installed \(pip install vllm"):
        GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))


def test_auto_falls_back_to_hf_and_says_why(small_cfg, capsys):
    cfg = small_cfg("grpo.rollout=auto")
    trainer = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))
    assert isinstance(trainer.rollout_engine, HFRolloutEngine)
    assert "grpo.rollout=auto uses hf: vLLM is not installed" in capsys.readouterr().err


def test_hf_rollouts_carry_no_sampler_logprobs_and_log_no_mismatch(small_cfg):
    cfg = small_cfg("grpo.max_steps=1")
    trainer = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))
    metrics, rollouts = trainer.train_step(0)
    assert rollouts[0].sampler_logp is None
    assert not any(key.startswith("rollout/") for key in metrics) and "time/weight_sync" not in metrics


@pytest.mark.parametrize("key, value, message", [
    ("grpo.vllm.correction_cap", "0.5", "correction_cap must be >= 1"),
    ("grpo.vllm.gpu_memory_utilization", "1.5", "gpu_memory_utilization must be in"),
    ("grpo.vllm.correction", "tokens", "correction"),
])
def test_vllm_settings_are_validated(small_cfg, key, value, message):
    with pytest.raises(ConfigError, match=message):
        small_cfg(f"{key}={value}")

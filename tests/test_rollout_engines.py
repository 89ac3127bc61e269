"""Choosing the rollout engine (grpo.rollout), mostly where vLLM is not installed (the main test venv)."""

import importlib.util

import pytest

from visual_rft.config import ConfigError
from visual_rft.rl.engines.hf import HFRolloutEngine
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.rewards import task_rewards
from visual_rft.runtime import load_split

without_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                  reason="vLLM is installed here: tests/test_vllm.py covers it")


@without_vllm
def test_vllm_without_vllm_stops_naming_the_install(small_cfg):
    cfg = small_cfg("grpo.rollout=vllm")
    with pytest.raises(ConfigError, match=r"grpo.rollout=vllm: vLLM is not installed \(pip install vllm"):
        GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))


@without_vllm
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


def test_vllm_gets_a_twin_of_a_directory_this_project_wrote(tiny_model_dir):
    """vLLM builds the stock processor (with a video processor in transformers >= 5.19): the twin links
    every file, names the stock class and derives the video processor's config; a stock directory and
    a hub id are passed through."""
    import json
    from pathlib import Path

    from visual_rft.rl.engines.vllm_model_dir import serving_dir

    twin = Path(serving_dir(str(tiny_model_dir)))
    assert twin != tiny_model_dir
    processor = json.loads((twin / "processor_config.json").read_text())
    assert processor["processor_class"] == "Qwen2VLProcessor"
    assert (twin / "model.safetensors").resolve() == (tiny_model_dir / "model.safetensors").resolve()
    # transformers names a video processor only where torchvision is installed (vLLM's environment)
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    named = VIDEO_PROCESSOR_MAPPING_NAMES.get("qwen2_vl")
    named = next((n for n in named.values() if n), None) if isinstance(named, dict) else named
    if named:
        video = json.loads((twin / "video_preprocessor_config.json").read_text())
        assert video["video_processor_type"] == named == "Qwen2VLVideoProcessor"
        assert video["patch_size"] == processor["image_processor"]["patch_size"]
    else:
        assert not (twin / "video_preprocessor_config.json").exists()
    assert serving_dir(str(twin)) == str(twin)  # already stock
    assert serving_dir("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"

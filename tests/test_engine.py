"""engine.py's decisions that need no second process (the launches themselves: test_deepspeed.py)."""

import types

import pytest
import torch

from visual_rft.config import ConfigError
from visual_rft.engine import (Engine, _fill_deepspeed_config, deepspeed_load_dtype, launch_load_dtype, make_accelerator,
                               unwrap_model)


def _plugin(**ds):
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, **ds}
    return types.SimpleNamespace(deepspeed_config=config, gradient_accumulation_steps=1)


def test_the_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_run():
    plugin = _plugin()
    _fill_deepspeed_config(plugin, "grpo", micro_batch=2, grad_accum=3, max_grad_norm=0.5, world=4)
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and plugin.gradient_accumulation_steps == 3
    # model/ in a checkpoint needs the whole weights gathered under ZeRO-3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_config_that_contradicts_the_run_names_both_settings():
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 but sft.batch_size=2"):
        _fill_deepspeed_config(_plugin(train_micro_batch_size_per_gpu=8), "sft", micro_batch=2, grad_accum=1,
                               max_grad_norm=1.0, world=1)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 but grpo.grad_accum_steps=2"):
        _fill_deepspeed_config(_plugin(gradient_accumulation_steps=4), "grpo", micro_batch=1, grad_accum=2,
                               max_grad_norm=1.0, world=1)


def test_weights_load_in_deepspeeds_precision_and_never_bf16_without_its_masters():
    bf16 = {"bf16": {"enabled": True}}
    assert deepspeed_load_dtype("auto", bf16) == "bfloat16"
    assert deepspeed_load_dtype("auto", {}) == "float32"
    assert deepspeed_load_dtype("bfloat16", bf16) == "bfloat16"
    with pytest.raises(ConfigError, match="without fp32 masters"):
        deepspeed_load_dtype("bfloat16", {"bf16": {"enabled": False}})


def test_a_launch_precision_contradicting_an_explicit_model_dtype_stops_naming_both():
    """Issue 27, item 2: float32 under a bf16 launch config was loaded in float32 and then cast to bf16
    by DeepSpeed without a word (deepspeed_load_dtype returned float32); accelerate's autocast likewise."""
    with pytest.raises(ConfigError, match=r"model.dtype=float32 but the launch config's mixed_precision is bfloat16: "
                                          r"DeepSpeed would cast.*--mixed_precision no"):
        deepspeed_load_dtype("float32", {"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"model.dtype=float32 .* accelerate would autocast"):
        launch_load_dtype("float32", torch.bfloat16, deepspeed=False)
    assert launch_load_dtype("float32", None, deepspeed=False) == "float32"  # mixed_precision no
    assert launch_load_dtype("auto", torch.bfloat16, deepspeed=False) == "auto"  # follows the launch config


def test_deepspeed_asked_for_on_the_cpu_beside_a_gpu_stops_instead_of_turning_into_ddp(small_cfg, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="would drop DeepSpeed"):
        make_accelerator(small_cfg("model.device=cpu"))


def test_unwrap_model_sees_through_a_deepspeed_engine():
    class DeepSpeedEngine(torch.nn.Module):  # recognised by name: no deepspeed import needed
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(DeepSpeedEngine(inner)) is inner
    assert unwrap_model(inner) is inner


def test_a_deepspeed_checkpoint_resumed_in_one_process_names_the_engine_in_words(small_cfg, tmp_path):
    """Issue 27, item 5: the message read "this run is NO on 1 process(es)" (accelerate's enum name)."""
    engine = Engine(small_cfg(), "grpo", micro_batch=1, grad_accum=1, max_grad_norm=1.0)
    (tmp_path / "checkpoint-2" / "deepspeed").mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        engine.load_state(None, tmp_path / "checkpoint-2", optimizer=None, scheduler=None)
    assert "this run is one process without DeepSpeed, device cpu: resume with the launch config" in str(caught.value)
    assert engine.precision() == "weights float32"

"""The shipped accelerate launch configs: valid for accelerate here; on two GPUs each trains the tiny model
(DeepSpeed ones also run on 2 CPU processes: test_deepspeed.py; ddp.yaml and fsdp.yaml are launched on
2 CPU processes below, in `make test-engines`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

LAUNCH = Path(__file__).parent.parent / "configs" / "accelerate"
EXPECTED = {"ddp": (DistributedType.MULTI_GPU, None), "zero2": (DistributedType.DEEPSPEED, 2),
            "zero3": (DistributedType.DEEPSPEED, 3), "fsdp": (DistributedType.FSDP, None)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_parses_with_accelerate(name):
    config = ClusterConfig.from_yaml_file(str(LAUNCH / f"{name}.yaml"))
    kind, stage = EXPECTED[name]
    assert config.distributed_type == kind and config.num_processes == 8
    if stage is not None:
        # the micro-batch, accumulation and clipping come from the run's section (engine.py), so a
        # value here could only contradict it
        assert config.deepspeed_config["zero_stage"] == stage
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config.deepspeed_config)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_trains_the_tiny_model_on_two_gpus(name, tiny_model_dir, digits_jsonl, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / f"{name}.yaml"),
           "--num_processes", "2", "-m", "visual_rft.cli", "train", "configs/demo.yaml",
           f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", f"output.dir={tmp_path}",
           "model.device=auto", "model.dtype=auto", "grpo.max_steps=2", "grpo.num_generations=4",
           "grpo.per_device_batch_size=1", "grpo.max_completion_length=8", "output.progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoint-2" / "model" / "config.json").is_file()


def _launch_on_cpu(name, tiny_model_dir, digits_jsonl, out):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / f"{name}.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "visual_rft.cli", "train", "configs/demo.yaml",
           f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", f"output.dir={out}", "eval.steps=-1",
           "grpo.max_steps=1", "grpo.num_generations=2", "grpo.per_device_batch_size=1",
           "grpo.max_completion_length=4", "output.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=LAUNCH.parent.parent)


@pytest.mark.deepspeed  # the engines' launches (make test-engines): ~1 min on 2 busy cores
def test_ddp_config_launches_two_cpu_processes(tiny_model_dir, digits_jsonl, tmp_path):
    done = _launch_on_cpu("ddp", tiny_model_dir, digits_jsonl, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "visual-rft: engine: DDP on 2 processes, device cpu, weights float32" in done.stderr
    assert (tmp_path / "run" / "checkpoint-1" / "model" / "model.safetensors").is_file()


@pytest.mark.deepspeed
def test_fsdp_config_without_cuda_stops_with_one_line_naming_what_runs(tiny_model_dir, digits_jsonl, tmp_path):
    """accelerate's FSDP plugin needs a GPU: before, each rank printed accelerate's traceback."""
    done = _launch_on_cpu("fsdp", tiny_model_dir, digits_jsonl, tmp_path / "run")
    assert done.returncode != 0 and "visual_rft/" not in done.stderr
    assert "an FSDP launch config on a machine without CUDA" in done.stderr and "ddp.yaml" in done.stderr
    assert not (tmp_path / "run").exists()

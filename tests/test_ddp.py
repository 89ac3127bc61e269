"""Data-parallel training: 2 CPU processes (torchrun, gloo) match 1 process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")


def _run(prefix, tiny_model_dir, digits_jsonl, out, *extra):
    cmd = [*prefix, "-m", "visual_rft.cli", "train", "configs/demo.yaml", f"model.name_or_path={tiny_model_dir}",
           f"data.train={digits_jsonl}", f"output.dir={out}", "grpo.max_steps=3", "grpo.num_generations=4",
           "grpo.max_completion_length=8", "grpo.optim.learning_rate=1e-3", "grpo.beta=0.04", "output.progress=false",
           "grpo.per_device_batch_size=1", "task.rewards=[accuracy, format, toy_rewards:text_length]", *extra]
    tests_and_sources = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": tests_and_sources, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")], load_file(
        str(out / "checkpoint-3" / "model" / "model.safetensors"))


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, digits_jsonl, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two_rows, two = _run([torchrun, "--standalone", "--nproc_per_node", "2"], tiny_model_dir, digits_jsonl,
                         tmp_path / "two", "grpo.grad_accum_steps=1")
    one_rows, one = _run([sys.executable], tiny_model_dir, digits_jsonl, tmp_path / "one", "grpo.grad_accum_steps=2")
    # sampling is seeded per global micro-batch slot, so both layouts draw the very same completions
    for a, b in zip(one_rows, two_rows):
        for key in ("reward/total_mean", "reward/format_mean", "completion_length", "parse_failure_rate"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # the weights differ only by the order of the gradient all-reduce
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-4
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 100 * diff  # both runs trained; they agree far more closely than they moved

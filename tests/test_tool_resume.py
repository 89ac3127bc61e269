"""A GRPO run with tools, killed (SIGKILL) after a checkpoint and resumed, ends bitwise where the
uninterrupted run ends: every turn of every conversation is drawn from seeds of (step, micro-batch
slot, turn), so the resumed steps redraw the same conversations, tool images and all (issue 29)."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from visual_rft.checkpoint import latest_checkpoint
from visual_rft.runlog import read_jsonl

from conftest import DEMO_CONFIG


def _cmd(model, out):
    return [sys.executable, "-m", "visual_rft.cli", "train", str(DEMO_CONFIG), f"model.name_or_path={model}",
            "data.train=embedded:mnist_rotated", "data.limit=8", "data.image_size=null", "tools.enabled=true",
            "tools.names=[rotate]", "tools.max_turns=3", f"output.dir={out}", "output.progress=false",
            "output.save_steps=1", "output.save_total_limit=2", "output.sample_steps=1", "grpo.max_steps=4",
            "grpo.num_generations=2", "grpo.per_device_batch_size=2", "grpo.max_completion_length=80",
            "grpo.optim.learning_rate=1e-3"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(ckpt):
    return load_file(str(ckpt / "model" / "model.safetensors"))


def test_a_killed_tool_run_resumes_bitwise(tool_warmup, tmp_path):
    _, warm = tool_warmup
    model = next(warm.glob("checkpoint-*")) / "model"
    whole = tmp_path / "whole"
    done = subprocess.run(_cmd(model, whole), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = read_jsonl(whole / "metrics.jsonl")
    # the run really converses: the warmed-up model calls rotate and answers after the rotated image
    assert sum(row["tool/calls_mean"] for row in expected) > 0 and max(row["tool/turns_mean"] for row in expected) > 1

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(model, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert latest_checkpoint(out).name in ("checkpoint-2", "checkpoint-3")

    resumed = subprocess.run([*_cmd(model, out), "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(latest_checkpoint(whole)), _weights(latest_checkpoint(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    drop = ("time/",)  # timings differ; everything drawn, scored and trained must not
    for want, have in zip(expected, got):
        assert {k: v for k, v in want.items() if not k.startswith(drop)} == \
            {k: v for k, v in have.items() if not k.startswith(drop)}
    turns = [json.loads(line)["turns"] for line in (whole / "rollouts.jsonl").read_text().splitlines()]
    assert turns == [json.loads(line)["turns"] for line in (out / "rollouts.jsonl").read_text().splitlines()]

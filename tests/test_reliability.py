"""Reliability: SIGKILL at any moment loses nothing, NaN never reaches the weights."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from visual_rft.checkpoint import latest_checkpoint, list_checkpoints
from visual_rft.rewards import resolve_rewards
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runlog import read_jsonl
from visual_rft.runtime import load_split


def _weights(ckpt):
    return load_file(str(next((ckpt / "model").glob("*.safetensors"))))


def _train_cmd(tiny_model_dir, digits_jsonl, out, *extra):
    return [sys.executable, "-m", "visual_rft.cli", "train", "configs/demo.yaml",
            f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", f"output.dir={out}",
            "grpo.max_steps=6", "grpo.num_generations=4", "grpo.per_device_batch_size=2",
            "grpo.max_completion_length=8", "grpo.optim.learning_rate=1e-2", "grpo.beta=0.04",
            "task.rewards=[accuracy, format, toy_rewards:text_length]", "output.save_steps=1",
            "output.save_total_limit=2", "output.progress=false", *extra]


def _env(**extra):
    tests_dir = os.path.dirname(__file__)
    return {**os.environ, "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, digits_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_train_cmd(tiny_model_dir, digits_jsonl, out), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return latest_checkpoint(out)


def test_every_checkpoint_file_has_the_mode_of_its_config(uninterrupted):
    """The weights writer made model.safetensors 0600 while the rest was 0644 (issue 18, item 7)."""
    modes = {str(p.relative_to(uninterrupted)): oct(p.stat().st_mode & 0o777)
             for p in uninterrupted.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct((uninterrupted / "config.yaml").stat().st_mode & 0o777)}, modes


def test_sigkill_during_a_checkpoint_write_then_resume_is_bitwise_identical(uninterrupted, tiny_model_dir,
                                                                           digits_jsonl, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run(_train_cmd(tiny_model_dir, digits_jsonl, out), env=_env(VISUAL_RFT_FAULT="checkpoint:3"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert list((out).glob(".tmp-checkpoint-3")), "the kill should have hit the half-written checkpoint 3"
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # never the torn one
    resumed = subprocess.run(_train_cmd(tiny_model_dir, digits_jsonl, out, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(latest_checkpoint(out), uninterrupted)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_identical(uninterrupted, tiny_model_dir,
                                                                    digits_jsonl, tmp_path):
    out = tmp_path / "run"
    delay = random.Random(os.getpid()).uniform(0.5, 3.0)  # after start-up, before the end (logged on failure)
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, digits_jsonl, out), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until training has really started, then kill after a random delay
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for attempt in range(3):  # the kill may have come after the end: resuming a finished run is a no-op
        done = subprocess.run(_train_cmd(tiny_model_dir, digits_jsonl, out, "--resume"), env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (delay, done.stderr)
    _assert_same_weights(latest_checkpoint(out), uninterrupted)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6], delay


def _poisoned(trainer, bad_steps):
    """Make the loss NaN on the given steps (counted by calls to update)."""
    original, calls = trainer.loss, {"n": 0}
    update = trainer.update

    def counting_update(rollouts):
        calls["n"] += 1
        return update(rollouts)

    def loss(rollout, normalizer):
        value, stats = original(rollout, normalizer)
        return (value * float("nan"), stats) if calls["n"] in bad_steps else (value, stats)

    trainer.update, trainer.loss = counting_update, loss
    return trainer


def test_a_nan_step_is_skipped_and_never_reaches_the_weights(small_cfg):
    cfg = small_cfg("grpo.max_steps=3", "output.save_steps=1", "output.save_total_limit=0",
                    "grpo.optim.learning_rate=1e-2", "task.rewards=[toy_rewards:text_length]")
    rewards = resolve_rewards("classification", cfg.task.rewards, "strict")
    trainer = _poisoned(GRPOTrainer(cfg, load_split(cfg), rewards), bad_steps={2})
    with pytest.warns(RuntimeWarning, match="step 2: non-finite loss or gradient, update skipped"):
        out = trainer.fit()
    c1, c2, c3 = list_checkpoints(out)
    _assert_same_weights(c1, c2)  # step 2 changed nothing
    w3 = _weights(c3)
    assert all(torch.isfinite(t).all() for t in w3.values())
    assert any(not torch.equal(w3[k], _weights(c2)[k]) for k in w3)  # step 3 trained again
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped_steps_total"] for r in rows] == [0, 1, 1]


def test_consecutive_nan_steps_stop_the_run_with_a_clear_message(small_cfg):
    cfg = small_cfg("grpo.max_steps=5", "grpo.optim.max_nonfinite_steps=2", "output.save_steps=1",
                    "task.rewards=[toy_rewards:text_length]")
    rewards = resolve_rewards("classification", cfg.task.rewards, "strict")
    trainer = _poisoned(GRPOTrainer(cfg, load_split(cfg), rewards), bad_steps={2, 3})
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="2 consecutive steps"):
        trainer.fit()
    # step 2 was skipped (its checkpoint holds step 1's weights); step 3 stopped the run before saving
    (last,) = list_checkpoints(cfg.output.dir)
    assert last.name == "checkpoint-2"
    assert all(torch.isfinite(t).all() for t in _weights(last).values())

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_in_flight_and_resume_is_bitwise_identical(sig, uninterrupted, tiny_model_dir,
                                                                                 digits_jsonl, tmp_path):
    """What Slurm / Kubernetes send before a kill (issue 18, item 3): before, exit 143 in 0.04 s with
    every step since the last checkpoint lost (SIGINT: a traceback). save_steps=100: only the stop
    itself writes a checkpoint before the end."""
    out = tmp_path / "run"
    # the same rewards as `uninterrupted`'s, 0.3 s slower per call: the signal lands before the last step
    cmd = _train_cmd(tiny_model_dir, digits_jsonl, out, "output.save_steps=100",
                     "task.rewards=[accuracy, format, toy_rewards:slow_text_length]")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.2))  # somewhere in step 3 or 4
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    last = read_jsonl(metrics)[-1]["step"]
    assert 2 <= last < 6 and latest_checkpoint(out).name == f"checkpoint-{last}"  # no completed step lost
    assert f"stopped by {signal.Signals(sig).name} after step {last}" in err and "--resume" in err
    assert "Traceback" not in err
    resumed = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(latest_checkpoint(out), uninterrupted)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3, 4, 5, 6]


def _mount_small_disk(path, size):
    """A tmpfs of `size` bytes at `path` (needs root, as on these machines); False where it cannot."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_is_one_clear_line_and_keeps_the_earlier_checkpoint(uninterrupted, tiny_model_dir, digits_jsonl,
                                                                         tmp_path):
    """Issue 18, item 4: before, a raw torch traceback ("enforce fail at inline_container.cc"), the torn
    .tmp-checkpoint left behind. Room for one checkpoint and a half: checkpoint-2 cannot be written."""
    size = sum(p.stat().st_size for p in uninterrupted.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_small_disk(disk, int(size * 1.5)):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = disk / "run"
        done = subprocess.run(_train_cmd(tiny_model_dir, digits_jsonl, out), env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        message = done.stderr.strip().splitlines()[-1]
        assert f"cannot write checkpoint-2 in {out}: no space left on the device" in message
        assert "checkpoint-1 is intact" in message and "MB are free" in message
        assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]  # no torn tmp
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
        assert all(torch.isfinite(t).all() for t in _weights(out / "checkpoint-1").values())
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


class _Saves:
    """Stand-ins for the model, processor, optimiser and scheduler that save_checkpoint writes."""

    def __init__(self):
        self.weight = torch.zeros(1000)

    def save_pretrained(self, path, **_):
        os.makedirs(path, exist_ok=True)
        torch.save({"w": self.weight}, os.path.join(path, "weights.pt"))

    def parameters(self):
        return [self.weight]

    def state_dict(self):
        return {"state": {}, "w": self.weight}


def test_a_failed_checkpoint_write_removes_the_partial_one_and_says_so(tmp_path, monkeypatch):
    """The same without a tmpfs: torch.save fails on optimizer.pt of the second checkpoint."""
    from visual_rft.checkpoint import CheckpointWriteError, save_checkpoint
    from visual_rft.config import load_config

    cfg, part = load_config("configs/demo.yaml"), _Saves()
    kwargs = dict(model=part, processor=part, optimizer=part, scheduler=part, cfg=cfg)
    save_checkpoint(tmp_path, 1, **kwargs)
    real_save = torch.save

    def failing_save(obj, path, *args, **kw):
        if str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint-2 in .*\(while writing optimizer.pt\).*"
                                                   r"checkpoint-1 is intact"):
        save_checkpoint(tmp_path, 2, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]

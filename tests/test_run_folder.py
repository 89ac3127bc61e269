"""A run folder you can trust (issue 18, items 1 and 2): a resume that would continue another run
under this one's name stops, two writers cannot share a folder, a fresh run does not mix into an
old one. Each test failed before runfolder.py: the resume continued silently, both writers exited 0
with every step logged twice, the fresh run appended to the old metrics and kept its checkpoints."""

import json
import os
import subprocess
import sys

import pytest

from visual_rft.checkpoint import list_checkpoints
from visual_rft.cli import main
from visual_rft.runfolder import CHANGES_NAME, LOCK_NAME, RunLock, config_changes, harmless
from visual_rft.runlog import read_jsonl

from cli_runs import train_args


def _args(tiny_model_dir, digits_jsonl, out, *extra):
    return train_args(tiny_model_dir, digits_jsonl, out, *extra)


@pytest.fixture
def finished_run(tiny_model_dir, digits_jsonl, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, digits_jsonl, out)) == 0
    return out


def test_resume_with_settings_that_change_the_run_stops_naming_each(finished_run, tiny_model_dir, digits_jsonl,
                                                                     capsys):
    capsys.readouterr()
    args = _args(tiny_model_dir, digits_jsonl, finished_run, "grpo.max_steps=3", "grpo.num_generations=4",
                 "grpo.optim.learning_rate=0.01", "--resume")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "grpo.num_generations: 2 (in checkpoint-2) -> 4 (now)" in err
    assert "grpo.optim.learning_rate: 0.0003 (in checkpoint-2) -> 0.01 (now)" in err
    assert "grpo.max_steps" not in err  # extending a run is allowed
    assert "--resume-with-changes" in err
    assert [r["step"] for r in read_jsonl(finished_run / "metrics.jsonl")] == [1, 2]  # nothing ran


def test_resume_with_changes_continues_and_records_them(finished_run, tiny_model_dir, digits_jsonl):
    args = _args(tiny_model_dir, digits_jsonl, finished_run, "grpo.max_steps=3", "grpo.num_generations=4",
                 "--resume-with-changes")
    assert main(args) == 0
    assert [r["step"] for r in read_jsonl(finished_run / "metrics.jsonl")] == [1, 2, 3]
    changes = {r["key"]: r for r in read_jsonl(finished_run / CHANGES_NAME)}
    assert changes["grpo.num_generations"] == {"step": 2, "key": "grpo.num_generations", "before": 2, "after": 4,
                                               "computing": True}
    assert changes["grpo.max_steps"]["computing"] is False


def test_a_fresh_run_into_a_folder_holding_a_run_stops_or_overwrites(finished_run, tiny_model_dir, digits_jsonl,
                                                                     capsys):
    capsys.readouterr()
    assert main(_args(tiny_model_dir, digits_jsonl, finished_run, "grpo.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main(_args(tiny_model_dir, digits_jsonl, finished_run, "grpo.max_steps=1", "--overwrite")) == 0
    assert [r["step"] for r in read_jsonl(finished_run / "metrics.jsonl")] == [1]
    assert [p.name for p in list_checkpoints(finished_run)] == ["checkpoint-1"]  # not the old checkpoint-2


def test_a_held_folder_is_refused_naming_the_holder(tiny_model_dir, digits_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out, "sweep"):
        assert main(_args(tiny_model_dir, digits_jsonl, out)) == 2
    err = capsys.readouterr().err
    assert f"in use by visual-rft sweep (pid {os.getpid()}" in err
    assert not (out / "metrics.jsonl").exists() and not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_model_dir, digits_jsonl, tmp_path, one_thread):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                             "command": "train", "started": "earlier"}))
    assert main(_args(tiny_model_dir, digits_jsonl, out, "grpo.max_steps=1")) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_two_writers_started_together_one_runs_one_stops(tiny_model_dir, digits_jsonl, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "visual_rft.cli", *_args(tiny_model_dir, digits_jsonl, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert any("is in use by visual-rft train" in err for code, err in results if code == 2), results
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_which_settings_a_resume_may_change():
    saved = {"grpo": {"beta": 0.04, "max_steps": 10}, "output": {"save_steps": 5}, "model": {"name_or_path": "a"}}
    asked = {"grpo": {"beta": 0.0, "max_steps": 20}, "output": {"save_steps": 1}, "model": {"name_or_path": "b"}}
    changes = config_changes(saved, asked)
    assert [k for k, *_ in changes] == ["grpo.beta", "grpo.max_steps", "model.name_or_path", "output.save_steps"]
    assert [harmless(k) for k, *_ in changes] == [False, True, False, True]


def test_eval_into_a_training_runs_folder_points_at_its_eval_subfolder(finished_run, digits_jsonl, capsys):
    """eval writes config.yaml: into the run's own folder it replaced the config --resume reads."""
    before = (finished_run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["eval", "--out", str(finished_run), "configs/demo.yaml", f"data.eval={digits_jsonl}",
                 "output.progress=false"]) == 2
    assert f"--out {finished_run / 'eval'}" in capsys.readouterr().err
    assert (finished_run / "config.yaml").read_text() == before

"""Checks before any model loads (issue 11): unwritable output directories, missing data paths and
--resume without a checkpoint fail fast with the setting named; eval keeps the predictions it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visual_rft.cli import main

NO_MODEL = "model.name_or_path=/nonexistent/model"  # a model load would fail with another message


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    (tmp_path / "plain.txt").write_text("a regular file")
    return tmp_path / "plain.txt" / "run"


@pytest.mark.parametrize("argv, setting", [
    (["train", "output.dir={out}"], "output.dir"),
    (["sft", "output.dir={out}"], "output.dir"),
    (["eval", "output.dir={out}"], "output.dir"),
    (["eval", "--out", "{out}"], "--out"),
])
def test_output_dir_under_a_regular_file_fails_before_the_model_loads(digits_jsonl, under_a_file, capsys,
                                                                      argv, setting):
    args = [a.format(out=under_a_file) for a in argv]
    rc = main([*args[:1], f"data.train={digits_jsonl}", f"data.eval={digits_jsonl}", NO_MODEL, *args[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{setting}={under_a_file}" in err and "plain.txt is a file, not a directory" in err
    assert "/nonexistent/model" not in err  # the model was never looked at


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so chmod cannot make one here")
def test_read_only_output_dir_fails_before_the_model_loads(digits_jsonl, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc = main(["train", f"data.train={digits_jsonl}", NO_MODEL, f"output.dir={locked / 'run'}"])
    finally:
        locked.chmod(0o755)
    assert rc == 2 and f"output.dir={locked / 'run'}: cannot write there" in capsys.readouterr().err


def test_writability_probe_names_the_setting_and_leaves_nothing_behind(tmp_path):
    from visual_rft.preflight import OutputDirError, check_output_dir

    target = tmp_path / "new" / "run"
    assert check_output_dir(target, "output.dir") == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match=r"--out=.*f/sub: .*f is a file, not a directory"):
        check_output_dir(tmp_path / "f" / "sub", "--out")


def test_a_missing_data_path_fails_before_torch_is_imported(tmp_path):
    code = ("import sys; from visual_rft.cli import main; "
            f"rc = main(['train', 'data.train={tmp_path}/absent.jsonl', 'output.dir={tmp_path}/run']); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert f"data.train={tmp_path}/absent.jsonl: no such file or directory" in done.stderr


def test_eval_writes_predictions_as_it_goes(small_cfg, tmp_path, monkeypatch):
    from visual_rft import evaluate

    real, calls = evaluate.generate, {"n": 0}

    def failing_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", failing_second_batch)
    cfg = small_cfg("eval.batch_size=4")
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate.run_eval(cfg, out_dir=tmp_path / "ev")
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("completion" in r for r in rows)  # the first batch survived


def test_resume_without_a_checkpoint_is_refused_unless_asked(tiny_model_dir, digits_jsonl, tmp_path, capsys):
    cfg_args = ["configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}",
                "output.progress=false", "grpo.num_generations=2", "grpo.per_device_batch_size=2",
                "grpo.max_completion_length=4", f"output.dir={tmp_path / 'fresh'}", "output.save_steps=1",
                "grpo.max_steps=1"]
    assert main(["train", *cfg_args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no complete checkpoint in output.dir=" in err and "--resume-if-present" in err
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()
    assert main(["train", *cfg_args, "--resume-if-present"]) == 0  # nothing to resume: starts, and says so
    assert "no checkpoint in" in capsys.readouterr().out
    assert main(["train", *cfg_args[:-1], "grpo.max_steps=2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'fresh' / 'checkpoint-1'} (step 1 of 2)" in out


def test_checkpoint_saves_do_not_draw_library_progress_bars(small_cfg, capfd):
    from visual_rft.rl.trainer import train_grpo

    train_grpo(small_cfg("grpo.max_steps=1", "output.save_steps=1"))
    assert "Writing model shards" not in capfd.readouterr().err

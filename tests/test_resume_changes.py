"""`--resume-with-changes` applies what it accepts (issue 27, item 1): each test reads the value the
resumed steps used (metrics.jsonl's lr, the optimiser's param_groups saved after a resumed step, the
completions' length), not the config written. Before engine.Engine.load_state re-applied the run's
optimiser settings, the restored optimiser and scheduler states kept the checkpoint's learning rate,
schedule and betas: metrics.jsonl showed lr 0.0003 for every step after a change to 1e-3."""

import pytest
import torch

from visual_rft.cli import main
from visual_rft.runlog import read_jsonl

from cli_runs import train_args


def _args(tiny_model_dir, digits_jsonl, out, *extra):
    return train_args(tiny_model_dir, digits_jsonl, out, *extra, completion_tokens=6)


@pytest.fixture
def run_of_two_steps(tiny_model_dir, digits_jsonl, tmp_path, one_thread):
    """Two steps at lr 3e-4 (configs/demo.yaml), constant schedule; then `resume(*changes)`."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, digits_jsonl, out)) == 0

    def resume(*changes: str) -> list[dict]:
        assert main(_args(tiny_model_dir, digits_jsonl, out, "grpo.max_steps=4", *changes,
                          "--resume-with-changes")) == 0
        return read_jsonl(out / "metrics.jsonl")
    resume.out = out
    return resume


def test_a_new_learning_rate_is_the_rate_of_the_resumed_steps(run_of_two_steps):
    rows = run_of_two_steps("grpo.optim.learning_rate=0.001")
    assert [r["lr"] for r in rows] == [pytest.approx(3e-4)] * 2 + [pytest.approx(1e-3)] * 2


def test_a_new_schedule_runs_from_the_resumed_step(run_of_two_steps):
    # linear decay over the new 4 steps at the old peak: metrics log the rate after each step. This one
    # held before the fix too (the schedule's shape is rebuilt from the config; only its peak was restored)
    rows = run_of_two_steps("grpo.optim.lr_scheduler=linear")
    assert [r["lr"] for r in rows][2:] == [pytest.approx(3e-4 * 1 / 4), pytest.approx(0.0)]


def test_new_betas_and_weight_decay_are_the_optimisers(run_of_two_steps):
    run_of_two_steps("grpo.optim.adam_beta1=0.5", "grpo.optim.adam_beta2=0.9", "grpo.optim.weight_decay=0.1")
    # the optimiser state saved after resumed step 4 (configs/demo.yaml keeps one checkpoint)
    state = torch.load(run_of_two_steps.out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    groups = [(tuple(g["betas"]), g["weight_decay"], g["initial_lr"]) for g in state["param_groups"]]
    assert groups == [((0.5, 0.9), 0.1, 3e-4)] * len(groups)


def test_a_new_grpo_setting_shapes_the_resumed_steps(run_of_two_steps):
    rows = run_of_two_steps("grpo.max_completion_length=2")
    assert all(r["completion_length"] <= 2 for r in rows[2:])
    assert any(r["completion_length"] > 2 for r in rows[:2])  # the change is what limited them


def test_settings_a_resume_cannot_apply_are_refused_naming_them(run_of_two_steps, tiny_model_dir, digits_jsonl,
                                                                capsys):
    capsys.readouterr()
    args = _args(tiny_model_dir, digits_jsonl, run_of_two_steps.out, "model.lora.r=4", "--resume-with-changes")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.lora.r: 16 (in checkpoint-2) -> 4 (now)" in err and "start a new run from it" in err
    assert [r["step"] for r in read_jsonl(run_of_two_steps.out / "metrics.jsonl")] == [1, 2]

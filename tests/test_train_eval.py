"""Evaluation on data.eval during `train` (GRPO) and `sft`: every eval.steps and at the end, with the
verifier `visual-rft eval` uses, logged to metrics.jsonl as eval/* and drawn in the report."""

from __future__ import annotations

import pytest

from visual_rft.checkpoint import latest_checkpoint
from visual_rft.evaluate import evaluate_model
from visual_rft.report.build import write_report
from visual_rft.rl.trainer import train_grpo
from visual_rft.runlog import read_jsonl
from visual_rft.runtime import load_policy, load_split
from visual_rft.sft import train_sft

CHEAP = ("data.limit=6", "eval.batch_size=6", "eval.max_new_tokens=8")


def _eval_rows(out):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in read_jsonl(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)}


def _same_as_visual_rft_eval(cfg, logged):
    """The logged numbers equal `visual-rft eval` of the final checkpoint on data.eval."""
    import torch

    model, processor = load_policy(cfg, torch.device("cpu"), latest_checkpoint(cfg.output.dir) / "model")
    reference = evaluate_model(model, processor, load_split(cfg, "eval"), cfg, torch.device("cpu"), progress=False)
    for key in ("accuracy", "format_rate", "parse_failure_rate", "mean_completion_tokens"):
        assert logged[f"eval/{key}"] == pytest.approx(reference[key], abs=1e-12), key


def test_grpo_evaluates_every_eval_steps_and_at_the_end(small_cfg, tmp_path):
    cfg = small_cfg("grpo.max_steps=3", "eval.steps=2", "grpo.optim.learning_rate=1e-2", *CHEAP)
    out = train_grpo(cfg)
    rows = _eval_rows(out)
    assert sorted(rows) == [2, 3]
    assert {"eval/accuracy", "eval/format_rate", "eval/parse_failure_rate"} <= set(rows[3])
    assert all("loss" in r for r in read_jsonl(out / "metrics.jsonl"))  # merged into the step's own row
    _same_as_visual_rft_eval(cfg, rows[3])
    html = write_report([out], tmp_path / "r.html").read_text()
    assert 'alt="curve: eval"' in html


def test_sft_evaluates_at_the_end_by_default_and_off_row_steps_get_their_own_row(small_cfg):
    cfg = small_cfg("sft.max_steps=3", "sft.batch_size=4", "output.log_steps=2", *CHEAP)
    out = train_sft(cfg)
    assert sorted(_eval_rows(out)) == [3]  # eval.steps=0: only at the end
    _same_as_visual_rft_eval(cfg, _eval_rows(out)[3])
    cfg = small_cfg("sft.max_steps=3", "sft.batch_size=4", "output.log_steps=2", "eval.steps=1", *CHEAP)
    cfg.output.dir = str(out.parent / "every")
    rows = read_jsonl(train_sft(cfg) / "metrics.jsonl")
    assert [(r["step"], "loss" in r, "eval/accuracy" in r) for r in rows] == [
        (1, False, True), (2, True, True), (3, True, True)]


def test_no_eval_without_data_eval_or_with_steps_minus_one(small_cfg):
    out = train_grpo(small_cfg("grpo.max_steps=1", "eval.steps=-1", *CHEAP))
    assert _eval_rows(out) == {}

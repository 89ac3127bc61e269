"""SFT baseline, evaluation with the task's verifier, `score` and the CLI end to end."""

import json
import subprocess
import sys

import pytest

from visual_rft.cli import main
from visual_rft.evaluate import run_eval, summarize
from visual_rft.runlog import read_jsonl
from visual_rft.sft import sft_target, train_sft
from visual_rft.data.record import Record


def test_sft_target_reuses_the_solution_answer_block():
    record = Record(image="x.png", problem="", solution="<answer>garden phlox</answer>")
    assert sft_target(record, "hmm") == "<think>hmm</think><answer>garden phlox</answer>"
    assert sft_target(Record(image="x.png", problem="", solution="7"), "t") == "<think>t</think><answer>7</answer>"


def test_sft_lowers_the_loss_and_its_model_answers_in_format(small_cfg):
    cfg = small_cfg("sft.max_steps=25", "sft.optim.learning_rate=3e-3", "sft.batch_size=10", "eval.max_new_tokens=32")
    out = train_sft(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] / 3
    metrics = run_eval(cfg, model_path=str(out / "checkpoint-25" / "model"), out_dir=out / "eval")
    assert metrics["format_rate"] == 1.0 and metrics["parse_failure_rate"] == 0.0
    predictions = read_jsonl(out / "eval" / "predictions.jsonl")
    assert len(predictions) == metrics["num_samples"] == 20
    assert metrics["accuracy"] == pytest.approx(sum(p["accuracy"] for p in predictions) / 20)
    assert set(metrics["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert json.loads((out / "eval" / "metrics.json").read_text()) == metrics


def test_summarize_by_hand():
    rows = [{"accuracy": 1.0, "format": 1.0, "parse_failed": False, "label": "a", "completion_tokens": 4},
            {"accuracy": 0.0, "format": 0.0, "parse_failed": True, "label": "a", "completion_tokens": 8},
            {"accuracy": 1.0, "format": 1.0, "parse_failed": False, "label": "b", "completion_tokens": 6}]
    m = summarize(rows, ["accuracy", "format"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["format_rate"] == pytest.approx(2 / 3)
    assert m["parse_failure_rate"] == pytest.approx(1 / 3) and m["mean_completion_tokens"] == 6
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_command_adds_one_field_per_component(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", [
        {"completion": "<think>x</think><answer>Rose</answer>", "solution": "<answer>rose</answer>", "id": 1},
        {"completion": "<think>x</think><answer>desert-rose</answer>", "solution": "<answer>rose</answer>", "id": 2},
        {"completion": "rose", "solution": "<answer>rose</answer>", "id": 3},
    ])
    assert main(["score", "--mode", "strict", str(src), str(tmp_path / "strict.jsonl")]) == 0
    strict = read_jsonl(tmp_path / "strict.jsonl")
    assert [(r["id"], r["accuracy"], r["format"]) for r in strict] == [(1, 1.0, 1.0), (2, 0.0, 1.0), (3, 0.0, 0.0)]
    capsys.readouterr()
    assert main(["score", "--mode", "visual_rft", str(src), str(tmp_path / "orig.jsonl")]) == 0
    original = read_jsonl(tmp_path / "orig.jsonl")
    # the original's substring test accepts "desert-rose" for "rose" and reads a bare "rose" as the answer
    assert [(r["accuracy"], r["format"]) for r in original] == [(1.0, 1.0), (1.0, 1.0), (1.0, 0.0)]
    means = json.loads(capsys.readouterr().out)
    assert means == {"accuracy": 1.0, "format": 2 / 3,
                     "settings": {"task": "classification", "mode": "visual_rft", "thinking": "on"}}


def test_score_command_names_the_bad_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"completion": "a", "solution": "b"}\n{"completion": "a"}\n')
    assert main(["score", str(src), str(tmp_path / "out.jsonl")]) == 2
    assert "in.jsonl:2: missing string field 'solution'" in capsys.readouterr().err


def test_cli_errors_name_the_key_and_the_path(tmp_path, capsys):
    assert main(["train", "grpo.num_generation=4"]) == 2
    assert "did you mean 'num_generations'" in capsys.readouterr().err
    assert main(["eval", f"data.eval={tmp_path / 'missing.jsonl'}", "model.name_or_path=x"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_train_runs_on_a_local_model_and_dataset(tiny_model_dir, digits_jsonl, tmp_path):
    out = tmp_path / "cli-run"
    cmd = [sys.executable, "-m", "visual_rft.cli", "train", "configs/demo.yaml", f"model.name_or_path={tiny_model_dir}",
           f"data.train={digits_jsonl}", f"output.dir={out}", "grpo.max_steps=1", "grpo.num_generations=2",
           "grpo.per_device_batch_size=1", "grpo.max_completion_length=4", "output.progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(out)
    assert (out / "checkpoint-1" / "model" / "config.json").is_file()
    assert len(read_jsonl(out / "metrics.jsonl")) == 1

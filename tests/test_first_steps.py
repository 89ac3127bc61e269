"""What a new user hit on a fresh clone (issue 27, items 3, 5, 6 and 7), each on the tiny model:
train would not start from a run folder, a hub id without network printed ~30 s of retries, a failed
train left an empty output folder, weights were written 0600, eval --out replaced an earlier evaluation
without a word, and every command's stderr carried library noise."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from visual_rft.cli import main
from visual_rft.config import load_config


def _common(tiny_model_dir, digits_jsonl, out, *extra):
    return ["configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}",
            f"output.dir={out}", "grpo.max_steps=1", "grpo.num_generations=2", "grpo.per_device_batch_size=1",
            "grpo.max_completion_length=4", "sft.max_steps=1", "sft.batch_size=2", "eval.steps=-1",
            "output.progress=false", *extra]


def test_train_and_sft_start_from_a_run_folder_as_eval_and_export_take_it(tiny_model_dir, digits_jsonl, tmp_path,
                                                                         one_thread, capsys):
    """Before: "model directory 'runs/warm3' has no config.json"."""
    assert main(["sft", *_common(tiny_model_dir, digits_jsonl, tmp_path / "sft")]) == 0
    capsys.readouterr()
    assert main(["train", *_common(tmp_path / "sft", digits_jsonl, tmp_path / "grpo")]) == 0
    started = load_config(tmp_path / "grpo" / "config.yaml").model.name_or_path
    assert started == str(tmp_path / "sft" / "checkpoint-1" / "model")  # the weights it started from, recorded
    assert f"model.name_or_path={tmp_path / 'sft'} -> {started}" in capsys.readouterr().err
    assert main(["sft", *_common(tmp_path / "grpo", digits_jsonl, tmp_path / "sft2")]) == 0
    assert load_config(tmp_path / "sft2" / "config.yaml").model.name_or_path == str(
        tmp_path / "grpo" / "checkpoint-1" / "model")
    # eval reads model.name_or_path=RUN the same way (it took a run folder only as --model)
    assert main(["eval", *_common(tmp_path / "grpo", digits_jsonl, tmp_path / "unused"), f"data.eval={digits_jsonl}",
                 "eval.max_new_tokens=4", "eval.batch_size=20", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 20


def test_a_lora_run_as_the_start_says_how_to_merge_it(tiny_model_dir, digits_jsonl, tmp_path, one_thread, capsys):
    assert main(["train", *_common(tiny_model_dir, digits_jsonl, tmp_path / "lora", "model.lora.enabled=true")]) == 0
    capsys.readouterr()
    assert main(["train", *_common(tmp_path / "lora", digits_jsonl, tmp_path / "next")]) == 2
    assert f"holds LoRA adapters, not a whole model; merge them over their base first (visual-rft export " \
           f"{tmp_path / 'lora'} DIR)" in capsys.readouterr().err
    assert not (tmp_path / "next").exists()


def test_a_failed_train_leaves_no_empty_output_folder(digits_jsonl, tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    assert main(["train", *_common(tmp_path / "no-such-model", digits_jsonl, out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_a_hub_id_without_network_fails_in_one_line_at_once(command, digits_jsonl, tmp_path, capsys):
    """Before: five 'Retrying in Ns' lines over ~30 s, then the error (a hub that answers says at once
    that the repository does not exist: the same one line)."""
    hub_id = "visual-rft-tests/no-such-model"
    args = {"train": ["train", *_common(hub_id, digits_jsonl, tmp_path / "run")],
            "eval": ["eval", *_common(hub_id, digits_jsonl, tmp_path / "run"), f"data.eval={digits_jsonl}"],
            "predict": ["predict", hub_id, str(next((digits_jsonl.parent / "images").iterdir())),
                        "--config", "configs/demo.yaml"]}[command]
    started = time.monotonic()
    assert main(args) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert "Retry" not in err and elapsed < 15, (elapsed, err)
    assert err.count("\n") == 1 and hub_id in err


def test_model_files_are_readable_like_the_checkpoints(tiny_model_dir, digits_jsonl, tmp_path, one_thread):
    """Before: model.safetensors of tiny-model and export was 0600, the checkpoints' 0644."""
    def modes(folder):
        return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}

    tiny = modes(tiny_model_dir)
    assert tiny["model.safetensors"] == tiny["config.json"]
    assert main(["train", *_common(tiny_model_dir, digits_jsonl, tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    exported = modes(tmp_path / "export")
    assert exported["model.safetensors"] == exported["config.json"] == tiny["config.json"]


def test_eval_out_over_an_earlier_evaluation_needs_overwrite(tiny_model_dir, digits_jsonl, tmp_path, one_thread,
                                                             capsys):
    out = tmp_path / "eval"
    args = ["eval", *_common(tiny_model_dir, digits_jsonl, tmp_path / "unused"), f"data.eval={digits_jsonl}",
            "eval.max_new_tokens=4", "eval.batch_size=20", "--out", str(out)]
    assert main(args) == 0
    (out / "metrics.json").write_text('{"accuracy": 0.123}')  # stands for an earlier model's evaluation
    capsys.readouterr()
    assert main(args) == 2
    assert "holds an earlier evaluation (metrics.json, predictions.jsonl)" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == {"accuracy": 0.123}
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 20


NOISE = ("Setting accelerator to CPU", "Loading weights", "Writing model shards", "FutureWarning")


def test_commands_keep_library_noise_off_stderr(tiny_model_dir, digits_jsonl, tmp_path):
    """A LoRA run, its export and a predict, as a user runs them: DeepSpeed's accelerator pick, the
    transformers bars and peft's FutureWarning were on stderr in each (items 6 and 7)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DS_ACCELERATOR", None)
    image = str(next((digits_jsonl.parent / "images").iterdir()))
    script = ("import sys; from visual_rft.cli import main\n"
              f"for argv in {[['train', *_common(tiny_model_dir, digits_jsonl, tmp_path / 'run', 'model.lora.enabled=true')], ['export', str(tmp_path / 'run'), str(tmp_path / 'export')], ['predict', str(tmp_path / 'run'), image]]!r}:\n"
              "    assert main(argv) == 0, argv\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [word for word in NOISE if word in done.stderr] == [], done.stderr

"""One way to name a model (issue 18, item 6): `eval --model` takes what predict and export take —
a run folder, a checkpoint, a LoRA checkpoint over its recorded base, an export — and a path that
looks local and does not exist fails at once instead of after the hub's retries."""

import json

import pytest

from visual_rft.cli import main
from visual_rft.models import loading
from visual_rft.models.loading import load_model_config


def _train(tiny_model_dir, digits_jsonl, out, *extra):
    assert main(["train", "configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}",
                 f"output.dir={out}", "grpo.max_steps=1", "grpo.num_generations=2", "grpo.per_device_batch_size=1",
                 "grpo.max_completion_length=4", "output.progress=false", *extra]) == 0


def _eval(model, digits_jsonl, out, *extra):
    # configs/demo.yaml names runs/tiny-model, which need not exist: the model comes from --model
    assert main(["eval", "--model", str(model), "--out", str(out), "configs/demo.yaml", f"data.eval={digits_jsonl}",
                 "eval.max_new_tokens=4", "eval.batch_size=20", "output.progress=false", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_eval_takes_a_run_folder_like_its_latest_checkpoint(tiny_model_dir, digits_jsonl, tmp_path, one_thread):
    """Before: "has no config.json" for the run folder."""
    run = tmp_path / "run"
    _train(tiny_model_dir, digits_jsonl, run)
    by_run = _eval(run, digits_jsonl, tmp_path / "e1")
    by_model = _eval(run / "checkpoint-1" / "model", digits_jsonl, tmp_path / "e2")
    assert by_run == by_model and by_run["num_samples"] == 20


def test_eval_loads_lora_adapters_over_the_base_they_were_trained_on(tiny_model_dir, digits_jsonl, tmp_path,
                                                                     one_thread):
    """Before: the base came from the config's model.name_or_path (runs/tiny-model), then five hub retries."""
    run = tmp_path / "lora"
    _train(tiny_model_dir, digits_jsonl, run, "model.lora.enabled=true")
    assert (run / "checkpoint-1" / "model" / "adapter_config.json").is_file()
    metrics = _eval(run / "checkpoint-1", digits_jsonl, tmp_path / "e", "model.name_or_path=runs/not-there")
    assert metrics["num_samples"] == 20


def test_a_local_looking_missing_path_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)

    def hub(*args, **kwargs):
        raise AssertionError("asked the hub (five retries, ~30 s offline)")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", hub)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)  # as with network: a hub id goes to the hub
    with pytest.raises(FileNotFoundError, match="'runs/tiny-model' does not exist .*local runs/ folder"):
        load_model_config("runs/tiny-model")
    with pytest.raises(AssertionError, match="asked the hub"):  # an id with no local folder of that name
        load_model_config("someorg/some-model")

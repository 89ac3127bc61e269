"""`visual-rft predict` and `export` on real (tiny) runs: a full-weight run and a LoRA run."""

import json
import shutil
import statistics

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from visual_rft.cli import main
from visual_rft.config import load_config
from visual_rft.data.record import Record
from visual_rft.evaluate import predict, run_eval
from visual_rft.export import export_model
from visual_rft.model_source import load_source, resolve_model_source, source_config
from visual_rft.models.loading import load_processor
from visual_rft.predict import _draw, format_prediction, predict_image
from visual_rft.report.images import GT_COLOR, PALETTE
from visual_rft.rl.rollout import completion_logprobs
from visual_rft.rl.trainer import train_grpo
from visual_rft.runtime import load_split, prompt_batch

DEMO = "configs/demo.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, digits_jsonl):
    """Two GRPO steps on real digits with a reward that always varies, so the weights move."""
    root = tmp_path_factory.mktemp("runs")
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", f"data.eval={digits_jsonl}",
              "output.progress=false", "grpo.num_generations=4", "grpo.per_device_batch_size=2",
              "grpo.max_completion_length=6", "grpo.max_steps=2", "grpo.optim.learning_rate=1e-2",
              "task.rewards=[toy_rewards:text_length, format]", "eval.max_new_tokens=8", "data.limit=6"]
    full = train_grpo(load_config(DEMO, [*common, f"output.dir={root / 'full'}"]))
    lora = train_grpo(load_config(DEMO, [*common, f"output.dir={root / 'lora'}", "model.lora.enabled=true",
                                         "model.lora.r=4", "model.lora.dropout=0.0"]))
    return {"full": full, "lora": lora, "base": tiny_model_dir}


def _logprobs(model, processor, cfg):
    """log p of a fixed answer to the first training digit (prompt and image as in training)."""
    record = load_split(cfg, "train")[0]
    inputs, _ = prompt_batch([record], cfg, processor, torch.device("cpu"))
    ids = processor.tokenizer(["<think>I see a digit.</think><answer>7</answer>"], return_tensors="pt").input_ids
    with torch.no_grad():
        return completion_logprobs(model.eval(), inputs, ids, torch.ones_like(ids))


def _run_model(run):
    source = resolve_model_source(run)
    cfg = source_config(source)
    model, processor = load_source(source, cfg, torch.device("cpu"))
    return source, cfg, model, processor


def test_model_sources_resolve_each_form(runs, tmp_path):
    ckpt = runs["full"] / "checkpoint-2"
    for spec in (runs["full"], ckpt, ckpt / "model"):
        source = resolve_model_source(spec)
        assert (source.model, source.config, source.run, source.step) == (
            str(ckpt / "model"), ckpt / "config.yaml", runs["full"], 2)
    assert resolve_model_source(runs["lora"]).adapters and not resolve_model_source(runs["full"]).adapters
    assert resolve_model_source(runs["base"]).run is None
    assert resolve_model_source("Qwen/Qwen2-VL-2B-Instruct").model == "Qwen/Qwen2-VL-2B-Instruct"  # a hub id
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="run directory .*empty_run has no complete checkpoint"):
        resolve_model_source(tmp_path / "empty_run")
    with pytest.raises(FileNotFoundError, match="not a model directory .*no config.json"):
        resolve_model_source(tmp_path)
    with pytest.raises(NotADirectoryError):
        resolve_model_source(runs["full"] / "metrics.jsonl")


def test_export_has_the_checkpoints_logprobs_and_loads_in_eval(runs, tmp_path):
    source, cfg, model, processor = _run_model(runs["full"])
    out = tmp_path / "exported"
    result = export_model(str(runs["full"]), out)
    assert result["step"] == 2 and not result["lora_merged"] and "model.safetensors" in result["files"]
    exported = AutoModelForImageTextToText.from_pretrained(out)
    assert load_processor(str(out)).chat_template == processor.chat_template and processor.chat_template
    assert torch.equal(_logprobs(exported, load_processor(str(out)), cfg), _logprobs(model, processor, cfg))
    # the project's own eval loads it and predicts exactly what the checkpoint predicts
    eval_cfg = load_config(DEMO, [f"model.name_or_path={runs['base']}", f"data.eval={cfg.data.eval}", "data.limit=6",
                                  "eval.max_new_tokens=8", "output.progress=false"])
    assert run_eval(eval_cfg, str(out), tmp_path / "e1") == run_eval(eval_cfg, source.model, tmp_path / "e2")
    card = (out / "README.md").read_text()
    assert f"base_model: {runs['base']}" in card and "- step: 2" in card and f"`{cfg.data.train}`" in card
    assert "| reward/total_mean |" in card and "method: GRPO" in card
    carried = yaml.safe_load((out / "visual_rft_config.yaml").read_text())
    assert carried["model"]["name_or_path"] == str(out) and carried["task"] == yaml.safe_load(
        (runs["full"] / "config.yaml").read_text())["task"]


def test_export_merges_lora_to_the_adapters_logprobs(runs, tmp_path):
    source, cfg, model, processor = _run_model(runs["lora"])
    assert source.adapters and hasattr(model, "disable_adapter")
    with_adapters = _logprobs(model, processor, cfg)
    with model.disable_adapter():
        base = _logprobs(model, processor, cfg)
    assert (with_adapters - base).abs().max() > 1e-3  # the two steps did move the adapters
    out = tmp_path / "merged"
    assert export_model(str(runs["lora"]), out)["lora_merged"]
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.allclose(_logprobs(merged, load_processor(str(out)), cfg), with_adapters, atol=1e-5)
    assert "LoRA (r 4, alpha 32) merged" in (out / "README.md").read_text()


def test_export_bad_input_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), str(out)]) == 2
    assert "is not a model directory" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        export_model(str(runs["full"]), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.setattr("visual_rft.export.model_card", lambda *a: 1 / 0)  # fail after the weights are written
    with pytest.raises(ZeroDivisionError):
        export_model(str(runs["full"]), tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no OUT, no temporary directory


def test_predict_uses_the_runs_prompt_generation_and_rewards(runs):
    source, cfg, model, processor = _run_model(runs["full"])
    record = load_split(cfg, "train")[0]
    greedy = predict_image(str(runs["full"]), str(record.image))
    (row,) = predict(model, processor, [record], cfg, torch.device("cpu"), progress=False)  # eval's own path
    assert greedy["samples"][0]["completion"] == row["completion"] and greedy["step"] == 2
    assert greedy["prompt"] == cfg.task.question + "\n" + cfg.task.instruction and greedy["temperature"] == 0.0
    group = predict_image(str(runs["full"] / "checkpoint-2"), str(record.image), samples=4, temperature=1.0,
                          solution=record.solution)
    assert len(group["samples"]) == 4 and len({s["completion"] for s in group["samples"]}) > 1
    totals = [s["reward"] for s in group["samples"]]
    for s in group["samples"]:  # text_length + format, each as the reward functions score it
        assert s["rewards"]["toy_rewards:text_length"] == pytest.approx(len(s["completion"]) / 100)
        assert s["reward"] == pytest.approx(sum(s["rewards"].values()))
        expected = (s["reward"] - statistics.fmean(totals)) / (statistics.stdev(totals) + 1e-4)
        assert s["advantage"] == pytest.approx(expected, abs=1e-3)
    text = format_prediction(group)
    assert text.count("\n[") == 4 and f"advantage {group['samples'][3]['advantage']:+.3f}" in text
    lora = predict_image(str(runs["lora"]), str(record.image), samples=2, temperature=1.0)
    assert lora["model"].endswith("checkpoint-2/model") and len(lora["samples"]) == 2


def test_predict_draws_the_solution_and_each_samples_boxes(tmp_path, tiny_model_dir):
    image = tmp_path / "blank.png"
    Image.new("RGB", (200, 100), "white").save(image)
    solution = "<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1}]</answer>"
    result = predict_image(str(tiny_model_dir), str(image), task="detection", question="Find every {category}.",
                           fields=["category=tree"], solution=solution, out=str(tmp_path / "drawn.png"),
                           max_new_tokens=4)
    assert result["prompt"].startswith("Find every tree.\n") and result["image_out"] == str(tmp_path / "drawn.png")
    assert set(result["samples"][0]["rewards"]) == {"iou", "confidence", "format"}
    cfg = source_config(resolve_model_source(str(tiny_model_dir)), None, ["task.name=detection"])
    record = Record(image=image, problem="", solution=solution, fields={"box_space": "qwen2vl", "image_size": [200, 100]})
    _draw(cfg, record, [[((0, 0, 500, 500), 0.9)], None], tmp_path / "two.png")
    drawn = Image.open(tmp_path / "two.png").convert("RGB")
    scale = drawn.width / 200  # report/images.py shows small images enlarged
    hex_rgb = lambda c: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))  # noqa: E731
    assert drawn.getpixel((round(20 * scale), round(50 * scale))) == hex_rgb(GT_COLOR)  # gt left edge: x = 0.1 * 200
    assert drawn.getpixel((round(60 * scale), round(50 * scale) - 1)) == hex_rgb(PALETTE[0])  # sample 1 bottom edge
    assert not list(tmp_path.glob(".*.tmp"))


def test_predict_bad_input_is_named_before_any_model_loads(tmp_path, tiny_model_dir, capsys):
    assert main(["predict", str(tiny_model_dir), str(tmp_path / "missing.png")]) == 2
    assert "image " + str(tmp_path / "missing.png") + " does not exist" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path / "missing.png")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot open image"):
        predict_image(str(tiny_model_dir), str(tmp_path / "text.png"))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"needs field\(s\) \['category'\]"):
        predict_image(str(tiny_model_dir), str(tmp_path / "ok.png"), task="detection", question="Find the {category}.")
    with pytest.raises(ValueError, match="--temperature 0 gives N copies"):
        predict_image(str(tiny_model_dir), str(tmp_path / "ok.png"), samples=3, temperature=0)
    with pytest.raises(ValueError, match="--solution: solution does not parse as detection"):
        predict_image(str(tiny_model_dir), str(tmp_path / "ok.png"), task="detection", question="q",
                      solution="<answer>[{'Position': [1, 2]}]</answer>", out=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["ok.png", "text.png"]


def test_lora_checkpoints_load_through_load_policy_so_resume_is_exact(runs, tmp_path):
    """Before load_policy read adapter directories, resuming (or evaluating) a LoRA run failed
    with 'no config.json'; now checkpoint-1 + one step gives checkpoint-2's adapters exactly."""
    cfg = load_config(runs["lora"] / "config.yaml", [f"output.dir={tmp_path / 'resumed'}", "output.save_steps=1",
                                                     "output.save_total_limit=5"])
    train_grpo(cfg)
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-2")
    train_grpo(cfg, resume=True)
    fresh = load_file(runs["lora"] / "checkpoint-2" / "model" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-2" / "model" / "adapter_model.safetensors")
    assert fresh.keys() == resumed.keys() and all(torch.equal(fresh[k], resumed[k]) for k in fresh)


def test_predict_asks_about_several_images_as_eval_does(runs, tmp_path, capsys):
    source, cfg, model, processor = _run_model(runs["full"])
    first, second = load_split(cfg, "train")[:2]
    pair = Record(image=[first.image, second.image], problem="", solution=first.solution)
    (row,) = predict(model, processor, [pair], cfg, torch.device("cpu"), progress=False)  # eval's own path
    both = predict_image(str(runs["full"]), [str(first.image), str(second.image)])
    assert both["samples"][0]["completion"] == row["completion"]
    inputs, _ = prompt_batch([pair], cfg, processor, torch.device("cpu"))
    assert inputs["image_grid_thw"].size(0) == 2
    assert main(["predict", str(runs["full"]), str(first.image), "--image", str(second.image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["completion"] == row["completion"]
    with pytest.raises(ValueError, match="detection asks about one image"):
        predict_image(str(runs["full"]), [str(first.image), str(second.image)], task="detection", question="q")

"""Eval, predict and the report on tool conversations (issue 29): a scripted model makes the calls
really happen (its turns are tokenized, run through the tool loop and the tools), the tiny model runs
the whole command line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visual_rft.cli import main
from visual_rft.config import load_config
from visual_rft.evaluate import evaluate_model
from visual_rft.models.loading import load_model_and_processor
from visual_rft.report.build import write_report
from visual_rft.rl.rollout import completion_mask, decode_completions, eos_token_ids
from visual_rft.rl.tool_rollout import summarize_tool_columns, tool_metric_columns
from visual_rft.runtime import load_split, record_images
from visual_rft.tools.images import rotate

DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"
ROTATE = '<think>x</think><tool_call>{"name": "rotate", "arguments": {"angle": 90}}</tool_call>'
BROKEN = '<think>x</think><tool_call>{"name": "rotate", "arguments": {"angle": </tool_call>'


def answer(label):
    return f"<think>y</think><answer>{label}</answer>"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):
    model, processor = load_model_and_processor(str(tiny_model_dir), dtype="float32", device="cpu")
    return model, processor


def tool_cfg(tiny_model_dir, tmp_path, *extra):
    return load_config(DEMO, [f"model.name_or_path={tiny_model_dir}", "data.train=embedded:mnist_rotated",
                              "data.eval=embedded:mnist_rotated", "data.limit=3", "data.image_size=null",
                              "tools.enabled=true", "tools.names=[rotate]", "eval.batch_size=3",
                              "eval.max_new_tokens=48", f"output.dir={tmp_path / 'out'}", "output.progress=false",
                              *extra])


class Script:
    """A model's turns by hand: turns[k] holds the texts of the rows drawn at turn k (the live ones).
    Stands in for rollout.generate (eval) and fast.generate_grouped (predict; `group` samples a row)."""

    def __init__(self, turns):
        self.turns, self.calls, self.seen = turns, 0, []

    def __call__(self, model, tokenizer, inputs, group=1, *, max_new_tokens, temperature, suppress_ids=None, **_):
        texts = self.turns[self.calls]
        self.calls += 1
        assert len(texts) == inputs["input_ids"].size(0) * group
        assert suppress_ids  # the vision tokens are never generated
        self.seen.append((max_new_tokens, temperature))
        eos = eos_token_ids(model, tokenizer)
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos[0]] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = completion_mask(ids, eos)
        return ids, mask, decode_completions(tokenizer, ids, mask)


@pytest.fixture(scope="module")
def scripted_eval(tiny, tiny_model_dir, tmp_path_factory):
    """Three records: 0 rotates then answers right; 1 answers at once, wrongly; 2's call is broken JSON
    (a parse error the tool answers with text, no image), then it answers right."""
    model, processor = tiny
    tmp = tmp_path_factory.mktemp("scripted")
    cfg = tool_cfg(tiny_model_dir, tmp)
    records = load_split(cfg, "eval")
    labels = [r.fields["label"] for r in records]
    script = Script([[ROTATE, answer("x"), BROKEN], [answer(labels[0]), answer(labels[2])]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("visual_rft.tool_eval.generate", script)
        metrics = evaluate_model(model, processor, records, cfg, torch.device("cpu"), tmp / "eval", progress=False)
    return {"cfg": cfg, "records": records, "labels": labels, "script": script, "metrics": metrics,
            "out": tmp / "eval"}


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eval_runs_the_tool_loop_and_keeps_every_turn(scripted_eval):
    out, labels, records = scripted_eval["out"], scripted_eval["labels"], scripted_eval["records"]
    assert scripted_eval["script"].seen == [(48, 0.0), (48, 0.0)]  # eval.max_new_tokens per turn, greedy
    rows = read_rows(out / "predictions.jsonl")
    assert [r["completion"] for r in rows] == [answer(labels[0]), answer("x"), answer(labels[2])]
    assert [r["tool_calls"] for r in rows] == [1, 0, 1]
    assert [r["truncated"] for r in rows] == [False, False, False]
    assert [r["accuracy"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["format"] for r in rows] == [1.0, 1.0, 0.0]  # the broken call spoils its conversation's format
    assert [r["prediction"] for r in rows] == [labels[0], "x", labels[2]]
    first, second = rows[0]["turns"]
    assert first["text"] == ROTATE and first["call"] == {"name": "rotate", "arguments": {"angle": 90}}
    assert first["error"] is None and first["result"] == "image 2: rotate {\"angle\": 90} of image 1, 56x56 pixels"
    assert first["image"] == "tool_images/0-1.png" and first["well_formed"] is True
    assert second == {"text": answer(labels[0]), "call": None, "error": None, "result": None,
                      "tokens": second["tokens"], "well_formed": True}
    assert [t["text"] for t in rows[1]["turns"]] == [answer("x")]
    broken = rows[2]["turns"][0]
    assert broken["error"] == "bad_json" and broken["call"] is None and broken["result"].startswith("error (bad_json)")
    assert "image" not in broken and broken["well_formed"] is False
    assert rows[0]["completion_tokens"] == sum(t["tokens"] for t in rows[0]["turns"])
    assert sorted(p.name for p in (out / "tool_images").iterdir()) == ["0-1.png"]
    shown = record_images(records[0], None, scripted_eval["cfg"].data.max_image_pixels)[0]
    saved = np.asarray(Image.open(out / first["image"]).convert("RGB"))
    assert np.array_equal(saved, np.asarray(rotate(shown, 90).convert("RGB")))
    assert not np.array_equal(saved, np.asarray(shown.convert("RGB")))


def test_eval_metrics_count_calls_errors_and_accuracy_with_and_without_a_call(scripted_eval):
    metrics, rows = scripted_eval["metrics"], read_rows(scripted_eval["out"] / "predictions.jsonl")
    assert json.loads((scripted_eval["out"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["format_rate"] == pytest.approx(2 / 3)
    assert metrics["tool/call_rate"] == pytest.approx(2 / 3)
    assert metrics["tool/calls_mean"] == pytest.approx(2 / 3)
    assert metrics["tool/turns_mean"] == pytest.approx(5 / 3)
    assert metrics["tool/call_error_rate"] == 0.5 and metrics["tool/errors/bad_json"] == 0.5
    assert metrics["tool/errors/unknown_tool"] == 0.0
    assert metrics["tool/accuracy_with_call"] == 1.0 and metrics["tool/accuracy_without_call"] == 0.0
    assert metrics["tool/conversations_with_call"] == 2 and metrics["tool/conversations_without_call"] == 1
    assert metrics["tool/truncated_rate"] == 0.0
    assert metrics["mean_completion_tokens"] == pytest.approx(sum(r["completion_tokens"] for r in rows) / 3)


def test_eval_metrics_from_rows_equal_the_trainers_from_conversations(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """tool_eval reads its tool/* metrics off the rows; the trainer off the conversations: they agree."""
    from visual_rft.tool_eval import conversation_rows, converse, eval_draw, tool_metrics
    from visual_rft.rewards import task_rewards

    model, processor = tiny
    cfg = tool_cfg(tiny_model_dir, tmp_path, "tools.max_turns=2", "tools.call_reward=1")
    records = load_split(cfg, "eval")
    # record 1 calls an unknown tool, record 2 calls rotate in its last turn (cut: truncated)
    monkeypatch.setattr("visual_rft.tool_eval.generate", Script([
        [ROTATE, '<think>x</think><tool_call>{"name": "blur", "arguments": {}}</tool_call>', answer(1)],
        [answer(0), ROTATE]]))
    convs = converse(model, processor, records, cfg, "cpu", eval_draw(model, processor, cfg, [1]))
    rows = conversation_rows(convs, records, task_rewards(cfg.task, ["accuracy", "format"], tools=cfg.tools))
    ours = tool_metrics(rows, "accuracy")
    theirs = summarize_tool_columns(tool_metric_columns([c.rows() for c in convs]))
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs)
    assert ours["tool/errors/unknown_tool"] == 0.5 and ours["tool/truncated_rate"] == pytest.approx(1 / 3)
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert [r["tool_calls_ok"] for r in rows] == [1.0, 0.0, 0.0]  # call_reward > 0 adds the per-call reward
    assert ours["tool_calls_ok"] == pytest.approx(1 / 3)
    assert all("image" not in t for r in rows for t in r["turns"])  # no folder: nothing written


def test_report_shows_the_conversation_turn_by_turn_with_the_tool_images(scripted_eval, tmp_path):
    from visual_rft.report.images import png_uri, render_image

    out = scripted_eval["out"]
    html = write_report([out], tmp_path / "report.html").read_text()
    assert html.count('class="turn"') == 5  # 2 + 1 + 2 turns of the three example conversations
    assert render_image(out / "tool_images" / "0-1.png") in html  # the rotated digit, embedded
    assert html.count('class="tool-image"') == 1
    assert "rotate {&quot;angle&quot;: 90} -&gt; image 2: rotate" in html
    assert '<span class="badge">bad_json</span>' in html
    assert "tool/call_rate" in html and "tool/accuracy_with_call" in html
    # a row naming a file outside the eval folder shows no image
    rows = read_rows(out / "predictions.jsonl")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), "red").save(secret)
    rows[0]["turns"][0]["image"] = "../" * 12 + str(secret).lstrip("/")
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (hostile / "metrics.json").write_text((out / "metrics.json").read_text())
    (hostile / "config.yaml").write_text((out / "config.yaml").read_text())
    page = write_report([hostile], tmp_path / "hostile.html").read_text()
    assert page.count('class="turn"') == 5 and 'class="tool-image"' not in page
    assert png_uri(Image.open(secret)) not in page


def test_report_shows_the_text_turns_of_grpo_rollouts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    turns = [{"text": ROTATE, "call": {"name": "rotate", "arguments": {"angle": 90}}, "error": None,
              "result": "image 2: rotate of image 1"}, {"text": answer(3), "call": None, "error": None, "result": None}]
    rows = [{"step": 1, "source": "s0", "prompt": "p", "solution": "<answer>3</answer>", "completion": answer(3),
             "advantage": 0.5, "accuracy": 1.0, "format": 1.0, "turns": turns},
            {"step": 1, "source": "s0", "prompt": "p", "solution": "<answer>3</answer>", "completion": answer(4),
             "advantage": -0.5, "accuracy": 0.0, "format": 1.0}]
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/accuracy": 0.5}) + "\n")
    (run / "config.yaml").write_text("task:\n  name: classification\n")
    html = write_report([run], tmp_path / "report.html").read_text()
    assert html.count('class="turn"') == 2 and "turn 2" in html
    assert "image 2: rotate of image 1" in html
    assert "&lt;answer&gt;4&lt;/answer&gt;" in html  # the one-turn row as before
    assert "<th>turns</th>" not in html


def test_predict_prints_every_turn_and_saves_the_tool_images(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from visual_rft.data.tool_digits import rotated_digit_records

    record = rotated_digit_records(limit=1)[0]
    image = tmp_path / "digit.png"
    record.image.save(image)
    label = record.fields["label"]
    script = Script([[ROTATE], [answer(label)]])
    monkeypatch.setattr("visual_rft.rl.fast.generate_grouped", script)
    folder = tmp_path / "shown"
    args = ["predict", str(tiny_model_dir), str(image), "tools.enabled=true", "tools.names=[rotate]",
            "data.image_size=null", "--solution", f"<answer>{label}</answer>", "--tool-images", str(folder),
            "--max-new-tokens", "40"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert script.seen == [(40, 0.0), (40, 0.0)]
    assert "tools rotate" in text and f"[1] answer {label!r}" in text
    assert f"turn 1: {ROTATE!r}" in text and f"turn 2: {answer(label)!r}" in text
    assert "tool rotate {'angle': 90} -> 'image 2: rotate" in text
    assert f"tool image: {folder / '1-1.png'}" in text and f"tool images: {folder}" in text
    assert "format 1" in text and "accuracy 1" in text
    saved = np.asarray(Image.open(folder / "1-1.png").convert("RGB"))
    assert np.array_equal(saved, np.asarray(rotate(Image.open(image).convert("RGB"), 90)))
    # without tools the prediction is one turn, as before
    monkeypatch.setattr("visual_rft.predict.generate_grouped", Script([[answer(label)]]))
    assert main(["predict", str(tiny_model_dir), str(image), "data.image_size=null", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"][0]["completion"] == answer(label) and "turns" not in result["samples"][0]
    assert "tools" not in result


def test_cli_eval_on_the_tiny_model_writes_conversations(tiny_model_dir, tmp_path):
    """The real tiny model through `visual-rft eval`: whatever it writes is a well-formed record of its turns."""
    out = tmp_path / "eval"
    assert main(["eval", str(DEMO), f"model.name_or_path={tiny_model_dir}", "data.eval=embedded:mnist_rotated",
                 "data.limit=4", "data.image_size=null", "tools.enabled=true", "tools.names=[rotate]",
                 "tools.max_turns=2", "eval.max_new_tokens=6", "eval.batch_size=2", "output.progress=false",
                 f"output.dir={out}"]) == 0
    rows = read_rows(out / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 4 and metrics["num_samples"] == 4
    for row in rows:
        assert 1 <= len(row["turns"]) <= 2 and row["completion"] == row["turns"][-1]["text"]
        assert row["tool_calls"] == sum(t["result"] is not None for t in row["turns"])
        assert row["completion_tokens"] == sum(t["tokens"] for t in row["turns"]) <= 12
        assert set(row["turns"][0]) >= {"text", "call", "error", "result", "tokens", "well_formed"}
        assert row["accuracy"] in (0.0, 1.0) and row["format"] in (0.0, 1.0)
        # 6 tokens cannot hold a call and its close tag, nor an answer: every conversation is cut or unformatted
        assert row["truncated"] or row["format"] == 0.0
    for key in ("tool/call_rate", "tool/calls_mean", "tool/turns_mean", "tool/call_error_rate", "tool/truncated_rate"):
        assert 0.0 <= metrics[key] <= 2.0
    assert metrics["tool/turns_mean"] == pytest.approx(sum(len(r["turns"]) for r in rows) / 4)
    assert metrics["tool/truncated_rate"] == pytest.approx(sum(r["truncated"] for r in rows) / 4)
    assert metrics["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / 4)
    assert (out / "config.yaml").is_file()


def test_training_eval_logs_tool_metrics_and_the_report_shows_rollout_turns(tiny_model_dir, tmp_path):
    """GRPO with tools and data.eval: the evaluation during training runs the tool loop (eval/tool/*
    in metrics.jsonl), and the report shows the sampled conversations' turns."""
    run = tmp_path / "run"
    assert main(["train", str(DEMO), f"model.name_or_path={tiny_model_dir}", "data.train=embedded:mnist_rotated",
                 "data.eval=embedded:mnist_rotated", "data.limit=2", "data.image_size=null", "tools.enabled=true",
                 "tools.names=[rotate]", f"output.dir={run}", "grpo.max_steps=1", "grpo.num_generations=2",
                 "grpo.per_device_batch_size=2", "grpo.max_completion_length=6", "eval.max_new_tokens=6",
                 "output.sample_steps=1", "output.progress=false"]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in logged if "eval/tool/turns_mean" in row][-1]
    assert last["eval/tool/turns_mean"] >= 1.0 and 0.0 <= last["eval/tool/call_rate"] <= 1.0
    assert "eval/tool/accuracy_with_call" not in last or 0.0 <= last["eval/tool/accuracy_with_call"] <= 1.0
    rollouts = read_rows(run / "rollouts.jsonl")
    turns = sum(len(r["turns"]) for r in rollouts)
    html = write_report([run], tmp_path / "report.html").read_text()
    assert len(rollouts) == 4 and html.count('class="turn"') == turns


def test_predict_tool_images_bad_input_is_named_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.new("RGB", (28, 28)).save(image)
    (tmp_path / "taken").write_text("a file")
    assert main(["predict", str(tiny_model_dir), str(image), "--tool-images", str(tmp_path / "x")]) == 2
    assert "--tool-images saves the images tools make: it needs tools.enabled=true" in capsys.readouterr().err
    assert main(["predict", str(tiny_model_dir), str(image), "tools.enabled=true", "tools.names=[rotate]",
                 "--tool-images", str(tmp_path / "taken")]) == 2
    assert f"--tool-images {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err

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
    theirs = summarize_tool_columns(tool_metric_columns(convs))
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs)
    assert ours["tool/errors/unknown_tool"] == 0.5 and ours["tool/truncated_rate"] == pytest.approx(1 / 3)
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert [r["tool_calls_ok"] for r in rows] == [1.0, 0.0, 0.0]  # call_reward > 0 adds the per-call reward
    assert ours["tool_calls_ok"] == pytest.approx(1 / 3)
    assert all("image" not in t for r in rows for t in r["turns"])  # no folder: nothing written

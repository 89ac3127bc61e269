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
    """A model's turns by hand: turns[k] holds the texts of the rows drawn at turn k (the live ones)."""

    def __init__(self, turns):
        self.turns, self.calls, self.seen = turns, 0, []

    def __call__(self, model, tokenizer, inputs, *, max_new_tokens, temperature, suppress_ids=None, **_):
        texts = self.turns[self.calls]
        self.calls += 1
        assert len(texts) == inputs["input_ids"].size(0)
        self.seen.append((max_new_tokens, temperature))
        eos = eos_token_ids(model, tokenizer)
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos[0]] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = completion_mask(ids, eos)
        return ids, mask, decode_completions(tokenizer, ids, mask)


def test_eval_runs_the_tool_loop_and_keeps_every_turn(tiny, tiny_model_dir, tmp_path, monkeypatch):
    model, processor = tiny
    cfg = tool_cfg(tiny_model_dir, tmp_path)
    records = load_split(cfg, "eval")
    labels = [r.fields["label"] for r in records]
    # record 0 rotates then answers right; record 1 answers at once, wrongly; record 2's call is broken
    # JSON (a parse error the tool answers), then it answers right
    script = Script([[ROTATE, answer("x"), BROKEN], [answer(labels[0]), answer(labels[2])]])
    monkeypatch.setattr("visual_rft.tool_eval.generate", script)
    out = tmp_path / "eval"
    metrics = evaluate_model(model, processor, records, cfg, torch.device("cpu"), out, progress=False)

    assert script.calls == 2 and script.seen == [(48, 0.0), (48, 0.0)]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [answer(labels[0]), answer("x"), answer(labels[2])]
    assert [r["tool_calls"] for r in rows] == [1, 0, 1]
    assert [r["truncated"] for r in rows] == [False, False, False]
    assert [r["accuracy"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["format"] for r in rows] == [1.0, 1.0, 0.0]  # the broken call spoils its conversation's format
    first, second = rows[0]["turns"]
    assert first["text"] == ROTATE and first["call"] == {"name": "rotate", "arguments": {"angle": 90}}
    assert first["error"] is None and first["result"].startswith("image 2: rotate")
    assert first["image"] == "tool_images/0-1.png"
    assert second == {"text": answer(labels[0]), "call": None, "error": None, "result": None,
                      "tokens": second["tokens"], "well_formed": True}
    broken = rows[2]["turns"][0]
    assert broken["error"] == "bad_json" and broken["call"] is None and "image" not in broken
    assert sorted(p.name for p in (out / "tool_images").iterdir()) == ["0-1.png"]
    shown = record_images(records[0], None, cfg.data.max_image_pixels)[0]
    saved = np.asarray(Image.open(out / first["image"]).convert("RGB"))
    assert np.array_equal(saved, np.asarray(rotate(shown, 90).convert("RGB")))

    saved_metrics = json.loads((out / "metrics.json").read_text())
    assert saved_metrics == json.loads(json.dumps(metrics))
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["format_rate"] == pytest.approx(2 / 3)
    assert metrics["tool/call_rate"] == pytest.approx(2 / 3)
    assert metrics["tool/calls_mean"] == pytest.approx(2 / 3)
    assert metrics["tool/turns_mean"] == pytest.approx(5 / 3)
    assert metrics["tool/call_error_rate"] == pytest.approx(0.5)
    assert metrics["tool/errors/bad_json"] == pytest.approx(0.5)
    assert metrics["tool/accuracy_with_call"] == 1.0 and metrics["tool/accuracy_without_call"] == 0.0
    assert metrics["tool/conversations_with_call"] == 2 and metrics["tool/truncated_rate"] == 0.0
    assert metrics["mean_completion_tokens"] == pytest.approx(sum(r["completion_tokens"] for r in rows) / 3)
    assert rows[0]["completion_tokens"] == sum(t["tokens"] for t in rows[0]["turns"])

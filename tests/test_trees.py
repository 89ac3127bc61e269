"""The deepforest tree photos: what the wheel holds, tiling rules, determinism, splits."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools

import numpy as np
import pytest

from visual_rft.data import trees
from visual_rft.data.errors import DataError
from visual_rft.tasks import detection


@pytest.fixture(scope="module")
def photos():
    try:
        return trees.tree_photos()
    except DataError as exc:
        pytest.skip(str(exc))


def test_the_wheel_holds_four_photos_with_951_boxes(photos):
    summary = {stem: (photo.size, len(boxes)) for stem, photo, boxes in photos}
    assert summary == {
        "2019_YELL_2_528000_4978000_image_crop2": ((2299, 2472), 574),
        "2019_YELL_2_541000_4977000_image_crop": ((1249, 1035), 279),
        "OSBS_029": ((400, 400), 61),
        "SOAP_061": ((400, 400), 37),
    }
    assert sum(len(b) for _, _, b in photos) == 951


def test_tile_origins_cover_evenly():
    assert trees.tile_origins(400, 224) == [0, 176]
    assert trees.tile_origins(224, 224) == [0] and trees.tile_origins(100, 224) == [0]
    starts = trees.tile_origins(2472, 224)
    assert len(starts) == 12 and starts[0] == 0 and starts[-1] + 224 == 2472
    assert max(b - a for a, b in itertools.pairwise(starts)) <= 224  # no gap between tiles


def test_box_kept_when_half_visible_and_clipped():
    boxes = ([90, 10, 110, 30], [95, 40, 125, 60], [200, 200, 210, 210])
    # tile [0, 100) x [0, 100): box 1 is exactly half inside (kept), box 2 only 1/6 (dropped), box 3 outside
    assert trees.boxes_in_tile(boxes, 0, 0, (100, 100), 0.5) == [[90, 10, 100, 30]]
    assert trees.boxes_in_tile(boxes, 0, 0, (100, 100), 0.1) == [[90, 10, 100, 30], [95, 40, 100, 60]]
    assert trees.boxes_in_tile(boxes, 100, 0, (100, 100), 0.5) == [[0, 10, 10, 30], [0, 40, 25, 60]]


def test_tiles_counts_boxes_inside_and_solutions(photos):
    records = trees.tree_records()
    assert len(records) == 151 and sum(len(r.fields["boxes"]) for r in records) == 1099
    assert len(trees.tree_records(include_empty=True)) == 170
    for record in records:
        f = record.fields
        assert record.image.size == (224, 224) and f["image_size"] == [224, 224] and f["category"] == "tree"
        assert all(0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224 for x1, y1, x2, y2 in f["boxes_pixels"])
        assert all(0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000 for x1, y1, x2, y2 in f["boxes"])
        assert detection.parse_solution(record.solution) == list(dict.fromkeys(tuple(b) for b in f["boxes"]))
    assert len({r.fields["image_id"] for r in records}) == len(records)


def test_tile_pixels_are_the_photo_crop(photos):
    record = trees.tree_records()[0]
    stem, (x0, y0) = record.fields["photo"], record.fields["origin"]
    photo = next(p for s, p, _ in photos if s == stem)
    expected = np.asarray(photo)[y0:y0 + 224, x0:x0 + 224]
    assert np.array_equal(np.asarray(record.image), expected)


def test_deterministic_and_seeded(photos):
    first, second = trees.tree_records(seed=0), trees.tree_records(seed=0)
    assert [r.source for r in first] == [r.source for r in second]
    assert [r.solution for r in first] == [r.solution for r in second]
    assert np.array_equal(np.asarray(first[5].image), np.asarray(second[5].image))
    other = trees.tree_records(seed=1)
    assert [r.source for r in other] != [r.source for r in first]
    assert sorted(r.source for r in other) == sorted(r.source for r in first)


def test_splits_are_disjoint_stratified_and_reachable_by_spec(photos):
    splits = trees.tree_splits()
    train, test = ({r.source for r in splits[k]} for k in ("train", "test"))
    assert not train & test and len(train) + len(test) == 151
    assert {r.fields["photo"] for r in splits["test"]} == {s for s, _, _ in photos}
    assert [r.source for r in trees.trees_from_spec("trees::test")] == [r.source for r in splits["test"]]
    assert len(trees.trees_from_spec("trees", limit=7)) == 7
    with pytest.raises(DataError, match="unknown split 'val'"):
        trees.trees_from_spec("trees::val")


def test_other_tile_size_and_space(photos):
    records = trees.tree_records(tile=448, box_space="normalized")
    assert len(records) == 46 and records[0].image.size == (448, 448)
    assert all(0 <= v <= 1 for r in records for b in r.fields["boxes"] for v in b)
    with pytest.raises(DataError, match="tile must be at least 28"):
        trees.tree_records(tile=10)


def test_missing_deepforest_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(DataError, match=r"pip install --no-deps deepforest==2\.1\.0"):
        trees.deepforest_data_dir()


def test_spec_options(photos):
    records = trees.trees_from_spec("trees::train?tile=112&box_space=pixels&seed=2")
    assert records[0].image.size == (112, 112) and records[0].fields["box_space"] == "pixels"
    assert len(records) + len(trees.trees_from_spec("trees::test?tile=112&seed=2")) == 417
    assert len(trees.trees_from_spec("trees?tile=112&empty=1")) == 635
    with pytest.raises(DataError, match="unknown option 'size'"):
        trees.trees_from_spec("trees?size=3")


def test_fewshot_cli_for_detection_samples_k_queries_per_category(tmp_path, capsys):
    from visual_rft.cli import main
    from visual_rft.data.sources import load_records

    try:
        trees.tree_photos()
    except DataError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "k3"
    assert main(["data", "fewshot", "embedded:trees::train?tile=56", str(out), "--k", "3", "--task", "detection"]) == 0
    chosen = load_records(str(out / "data.jsonl"))
    assert len(chosen) == 3 and {r.fields["category"] for r in chosen} == {"tree"}  # one category: 3 tiles
    assert all(r.fields["boxes"] for r in chosen)  # the boxes travel with the written split
    capsys.readouterr()
    # classification's class key does not exist on detection records: a clear error, not a crash
    assert main(["data", "fewshot", "embedded:trees::train?tile=56", str(tmp_path / "bad"), "--k", "3"]) == 2
    assert "label" in capsys.readouterr().err


def test_pixel_boxes_with_a_square_resize_are_refused_early(tmp_path):
    from visual_rft.config import ConfigError, load_config
    from visual_rft.runtime import load_split

    try:
        trees.tree_photos()
    except DataError as exc:
        pytest.skip(str(exc))
    spec = "embedded:trees::test?tile=56&box_space=pixels"
    cfg = load_config(None, ["task.name=detection", f"data.eval={spec}", "data.image_size=28",
                             "task.box_space=qwen2vl"])  # the source's own box_space=pixels wins
    with pytest.raises(ConfigError, match=r"'pixels' of a 56x56 frame.*data.image_size=28"):
        load_split(cfg, "eval")
    cfg.data.image_size = 56  # the tiles' own size: nothing moves
    assert load_split(cfg, "eval")[0].fields["box_space"] == "pixels"
    relative = load_config(None, ["task.name=detection", "data.eval=embedded:trees::test?tile=56", "data.image_size=28",
                                  "task.box_space=qwen2vl"])
    assert load_split(relative, "eval")  # 0-1000 boxes survive any resize

"""COCO / LVIS / LISA loaders on small hand-written fixtures: counts, conversions, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from visual_rft.data.coco import load_coco
from visual_rft.data.detection_source import load_detection_source, parse_spec
from visual_rft.data.errors import DataError
from visual_rft.data.fewshot import sample_k_shot, write_split
from visual_rft.data.lisa import load_lisa
from visual_rft.data.ov_splits import (
    COCO_NAMES,
    COCO_OV_BASE_48,
    COCO_OV_BASE_65,
    COCO_OV_NOVEL_15,
    OVSplit,
    annotate_split,
    filter_to_base,
    lvis_frequency_groups,
    resolve_categories,
)
from visual_rft.data.sources import load_records
from visual_rft.data.targets import detection_solution, qwen_input_size
from visual_rft.tasks import detection, grounding

SIZES = {"a.png": (200, 100), "b.png": (100, 100), "c.png": (50, 80)}
COCO_FIXTURE = {
    "images": [{"id": i + 1, "file_name": name, "width": w, "height": h}
               for i, (name, (w, h)) in enumerate(SIZES.items())],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 30], "area": 1000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 50, 50, 50], "area": 2500, "iscrowd": 0},
        # 0.5 px past the right border, like COCO's own rounding overshoots
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [150, 0, 50.5, 20], "area": 1010, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 1},
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
    ],
}


def write_fixture(folder: Path, data: dict | None = None, name: str = "instances.json") -> Path:
    """Write the three tiny images and an annotation file; return the file's path."""
    for image, size in SIZES.items():
        if not (folder / image).exists():
            Image.new("RGB", size, (90, 120, 150)).save(folder / image)
    path = folder / name
    path.write_text(json.dumps(COCO_FIXTURE if data is None else data))
    return path


def test_one_record_per_image_and_present_category(tmp_path):
    records, report = load_coco(write_fixture(tmp_path))
    assert [(r.fields["image_id"], r.fields["category"]) for r in records] == [
        (1, "cat"), (1, "dog"), (2, "cat"), (2, "dog")]
    assert (report.images, report.annotations, report.positives, report.negatives) == (3, 6, 4, 0)
    assert report.clipped_boxes == 1 and report.skipped["crowd_annotations"] == 1
    assert report.empty_categories == ["bird"]
    cat = records[0]
    assert cat.problem == "" and cat.image == tmp_path / "a.png"
    assert cat.fields["boxes"] == [[100, 100, 300, 400], [500, 500, 750, 1000]]
    assert cat.fields["boxes_pixels"] == [[20.0, 10.0, 60.0, 40.0], [100.0, 50.0, 150.0, 100.0]]
    assert cat.fields["areas"] == [1000.0, 2500.0] and cat.fields["image_size"] == [200.0, 100.0]
    assert cat.solution == ("<answer>[{'Position': [100, 100, 300, 400], 'Confidence': 1}, "
                            "{'Position': [500, 500, 750, 1000], 'Confidence': 1}]</answer>")
    # the overshooting dog box: clipped as a target, kept as annotated for evaluation
    assert records[1].fields["boxes"] == [[750, 0, 1000, 200]]
    assert records[1].fields["boxes_pixels"] == [[150.0, 0.0, 200.5, 20.0]]
    assert records[3].fields["crowd"] == [[50.0, 50.0, 90.0, 90.0, 1600.0]]
    # the strict verifier reads the solution back as the same boxes
    assert detection.parse_solution(cat.solution) == [(100, 100, 300, 400), (500, 500, 750, 1000)]


@pytest.mark.parametrize("space, expected", [
    ("pixels", [[20.0, 10.0, 60.0, 40.0], [100.0, 50.0, 150.0, 100.0]]),
    ("normalized", [[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.75, 1.0]]),
])
def test_other_box_spaces(tmp_path, space, expected):
    records, _ = load_coco(write_fixture(tmp_path), box_space=space)
    assert records[0].fields["box_space"] == space and records[0].fields["boxes"] == expected
    assert detection.parse_solution(records[0].solution) == [tuple(b) for b in expected]


def test_pixel_space_in_the_model_input_frame(tmp_path):
    # 200x100 -> Qwen's smart_resize at 28 px patches gives 196x112; boxes scale with it.
    records, _ = load_coco(write_fixture(tmp_path), box_space="pixels",
                           input_size=lambda w, h: qwen_input_size(w, h, min_pixels=3136, max_pixels=401408))
    cat = records[0].fields
    assert cat["image_size"] == [196, 112] and cat["orig_size"] == [200.0, 100.0]
    assert cat["boxes"][0] == [19.6, 11.2, 58.8, 44.8]


def test_negatives_and_category_selection(tmp_path):
    path = write_fixture(tmp_path)
    records, report = load_coco(path, negatives=True)
    negatives = [(r.fields["image_id"], r.fields["category"]) for r in records if not r.fields["boxes"]]
    assert negatives == [(1, "bird"), (2, "bird"), (3, "cat"), (3, "dog"), (3, "bird")]
    assert all(r.solution == "<answer>No Objects</answer>" for r in records if not r.fields["boxes"])
    assert report.negatives == 5
    assert len({frozenset(r.fields) for r in records}) == 1  # same keys: batch columns stay aligned
    one, _ = load_coco(path, negatives=1, seed=3)
    again, _ = load_coco(path, negatives=1, seed=3)
    assert [r.source for r in one] == [r.source for r in again]
    assert sum(not r.fields["boxes"] for r in one) == 3  # one per image: images 1, 2, 3
    dogs, _ = load_coco(path, categories=["dog"])
    assert [r.fields["image_id"] for r in dogs] == [1, 2]


def test_limit_and_kshot_round_trip(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    assert len(load_coco(tmp_path / "instances.json", limit=3)[0]) == 3
    shots = sample_k_shot(records, 1, seed=0, label_key="category")
    assert sorted(r.fields["category"] for r in shots) == ["cat", "dog"]
    back = load_records(write_split(shots, tmp_path / "split"), task="detection")
    assert [r.solution for r in back] == [r.solution for r in shots]
    assert [r.fields["boxes"] for r in back] == [r.fields["boxes"] for r in shots]


def _broken(tmp_path: Path, edit) -> Path:
    data = copy.deepcopy(COCO_FIXTURE)
    edit(data)
    return write_fixture(tmp_path, data, "broken.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), r"broken\.json: not a COCO-format file: needs a 'annotations' list"),
    (lambda d: d["annotations"][2].update(image_id=99), r"broken\.json: annotations\[2\] \(id 3\): unknown image_id 99"),
    (lambda d: d["annotations"][0].update(category_id=7), r"annotations\[0\] \(id 1\): unknown category_id 7"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\] \(id 2\): bbox must be 4 finite"),
    (lambda d: d["annotations"][1].update(bbox=[150, 50, 80, 50]), r"annotations\[1\] \(id 2\).*outside the 200x100 image"),
    (lambda d: d["images"][1].update(width=0), r"image id 2 has no positive width/height"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"duplicate image id 1"),
])
def test_bad_annotation_files_name_file_and_entry(tmp_path, edit, message):
    with pytest.raises(DataError, match=message):
        load_coco(_broken(tmp_path, edit))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 2"):
        load_coco(path)


def test_degenerate_boxes_are_skipped_and_counted(tmp_path):
    path = _broken(tmp_path, lambda d: d["annotations"][1].update(bbox=[100, 50, 0, 50]))
    records, report = load_coco(path)
    assert report.skipped["degenerate_boxes"] == 1
    assert records[0].fields["boxes_pixels"] == [[20.0, 10.0, 60.0, 40.0]]
    # a 0.1 px wide box is real in pixels but collapses to x1 == x2 in the 0..1000 space: counted
    tiny = _broken(tmp_path, lambda d: d["annotations"][1].update(bbox=[100, 50, 0.1, 50]))
    records, report = load_coco(tiny)
    assert records[0].fields["boxes"][1] == [500, 500, 500, 1000] and report.collapsed_boxes == 1
    assert "1 targets collapsed" in report.summary()


def test_missing_images_error_or_skip(tmp_path):
    path = write_fixture(tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError, match=r"instances\.json: image id 2: image file not found: .*b\.png"):
        load_coco(path)
    records, report = load_coco(path, missing_images="skip")
    assert [r.fields["image_id"] for r in records] == [1, 1] and report.skipped["missing_images"] == 1


def test_stale_image_size_and_unknown_or_empty_categories(tmp_path):
    path = write_fixture(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"image id 1: .*a\.png is 10x10 but the file says 200x100"):
        load_coco(path)
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"unknown categories \['cta'\].*'cat'"):
        load_coco(path, categories=["cta"])
    with pytest.raises(DataError, match=r"requested categories have no .* boxes: \['bird'\]"):
        load_coco(path, categories="cat,bird")


def test_lvis_fields_negatives_and_frequency_split(tmp_path, capsys):
    data = copy.deepcopy(COCO_FIXTURE)
    for cat, freq in zip(data["categories"], "rcf"):
        cat["frequency"] = freq
    for image in data["images"]:  # LVIS names images by their COCO url only
        image["coco_url"] = "http://images.cocodataset.org/val2017/" + image.pop("file_name")
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = [5], []
    (tmp_path / "val2017").mkdir()
    write_fixture(tmp_path / "val2017")
    path = write_fixture(tmp_path, data, "lvis.json")
    records = load_records(f"lvis:{path}?negatives=all&ov_split=lvis", task="detection")
    # negatives only where LVIS verified absence (bird), never for unverified cat/dog on image 3
    assert [(r.fields["image_id"], r.fields["category"]) for r in records if not r.fields["boxes"]] == [
        (1, "bird"), (2, "bird"), (3, "bird")]
    # the load report, printed because a box was clipped and crowd boxes were skipped
    assert f"{path}: 4 positive + 3 negative queries from 3 images; 1 boxes clipped" in capsys.readouterr().err
    assert records[0].fields["frequency"] == "r" and records[0].fields["ov_split"] == "novel"
    assert records[1].fields["ov_split"] == "base" and records[0].fields["neg_category_ids"] == [5]
    assert lvis_frequency_groups(data["categories"]) == {"r": ["cat"], "c": ["dog"], "f": ["bird"]}
    with pytest.raises(DataError, match=r"categories\[0\] \(id 1, 'cat'\) has frequency None"):
        lvis_frequency_groups(COCO_FIXTURE["categories"])


def test_ov_split_lists():
    assert len(COCO_NAMES) == 80 and len(set(COCO_NAMES)) == 80
    assert len(COCO_OV_BASE_65) == 65 and len(COCO_OV_NOVEL_15) == 15
    assert set(COCO_OV_BASE_65) | set(COCO_OV_NOVEL_15) == set(COCO_NAMES)
    assert len(COCO_OV_BASE_48) == 48 and set(COCO_OV_BASE_48) <= set(COCO_NAMES)
    assert resolve_categories("coco_fewshot8,person")[-2:] == ["toilet", "person"]
    assert len(resolve_categories("coco_novel15")) == 15


def test_base_filter_and_split_annotation(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    split = OVSplit("t", frozenset({"cat"}), frozenset({"dog"}))
    assert [r.fields["ov_split"] for r in annotate_split(records, split)] == ["base", "novel", "base", "novel"]
    assert {r.fields["category"] for r in filter_to_base(records, split)} == {"cat"}


def test_detection_source_spec(tmp_path):
    path = write_fixture(tmp_path)
    assert parse_spec(f"coco:{path}?categories=dog&negatives=all") == (
        "coco", str(path), {"categories": "dog", "negatives": "all"})
    records = load_detection_source(f"coco:{path}?categories=dog&negatives=all&box_space=normalized")
    assert [(r.fields["image_id"], bool(r.fields["boxes"])) for r in records] == [(1, True), (2, True), (3, False)]
    assert records[0].fields["box_space"] == "normalized"
    with pytest.raises(DataError, match=r"unknown option 'nagatives=all'"):
        load_detection_source(f"coco:{path}?nagatives=all")
    with pytest.raises(DataError, match=r"seed=x.*invalid literal"):
        load_detection_source(f"coco:{path}?seed=x")
    with pytest.raises(DataError, match=r"unknown box space 'px'"):
        load_detection_source(f"coco:{path}?box_space=px")
    with pytest.raises(DataError, match="expected coco:PATH"):
        parse_spec("voc:x.json")


def test_detection_solution_format():
    assert detection_solution([]) == "<answer>No Objects</answer>"
    assert detection_solution([[1, 2, 3, 4]]) == "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1}]</answer>"


def test_lisa_layouts(tmp_path):
    write_fixture(tmp_path)
    rows = [
        {"image_path": "a.png", "instruction": ["the thing to sit on", "what a cat sleeps on"],
         "boxes": [[20, 10, 60, 40]]},
        {"image": "b.png", "problem": "the dog", "box": [10.5, 10, 40, 40]},
        {"id": "lisa_0", "conversations": [
            {"from": "user", "value": "<img>a.png</img>\n Output the bounding box in the image corresponding "
                                      "to the instruction: where to park"},
            {"from": "assistant", "value": "(100,100),(300,400)"}]},
    ]
    path = tmp_path / "lisa.json"
    path.write_text(json.dumps(rows))
    records, report = load_lisa(path)
    assert [r.fields["query"] for r in records] == [
        "the thing to sit on", "what a cat sleeps on", "the dog", "where to park"]
    assert records[0].solution == "<answer> (100,100),(300,400) </answer>"
    assert records[0].fields["box"] == [100, 100, 300, 400] and records[0].fields["box_pixels"] == [20, 10, 60, 40]
    assert records[2].fields["box"] == [105, 100, 400, 400]  # int(10.5 / 100 * 1000)
    assert records[3].fields["box_pixels"] == [20.0, 10.0, 60.0, 40.0] and records[3].image == tmp_path / "a.png"
    assert grounding.parse_solution(records[2].solution) == (105, 100, 400, 400)
    assert report.positives == 4
    assert load_detection_source(f"lisa:{path}")[1].fields["query"] == "what a cat sleeps on"


def test_lisa_bad_rows(tmp_path):
    write_fixture(tmp_path)
    path = tmp_path / "lisa.jsonl"
    path.write_text(json.dumps({"image": "a.png", "instruction": "x", "box": [0, 0, 0, 10]}) + "\n"
                    + json.dumps({"image": "a.png", "instruction": "y", "box": [0, 0, 10, 10]}) + "\n")
    records, report = load_lisa(path)
    assert len(records) == 1 and report.skipped["degenerate_boxes"] == 1
    path.write_text(json.dumps({"image": "a.png", "box": [0, 0, 10, 10]}) + "\n")
    with pytest.raises(DataError, match=r"lisa\.jsonl:1: needs a non-empty 'instruction'"):
        load_lisa(path)
    path.write_text(json.dumps({"image": "zz.png", "instruction": "x", "box": [0, 0, 10, 10]}) + "\n")
    with pytest.raises(DataError, match=r"lisa\.jsonl:1: image file not found"):
        load_lisa(path)
    path.write_text(json.dumps({"image": "a.png", "instruction": "x", "box": [0, 0, 300, 10]}) + "\n")
    with pytest.raises(DataError, match=r"lisa\.jsonl:1: box .* outside the 200x100 image"):
        load_lisa(path)
    (tmp_path / "empty.png").write_bytes(b"")  # LISA places boxes with the image's size: a clear error
    path.write_text(json.dumps({"image": "empty.png", "instruction": "x", "box": [0, 0, 10, 10]}) + "\n")
    with pytest.raises(DataError, match=r"lisa\.jsonl:1: .*empty\.png is not a readable image"):
        load_lisa(path)

"""Detection metrics against pycocotools, hand-computed AP and grounding IoUs, OV and LVIS groups."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from test_coco_data import COCO_FIXTURE, write_fixture

from visual_rft.data.coco import load_coco
from visual_rft.data.ov_splits import OVSplit, annotate_split
from visual_rft.data.record import Record
from visual_rft.data.sources import load_records
from visual_rft.det_eval import (
    coco_ground_truth,
    coco_results,
    detection_metrics,
    grounding_metrics,
)

NONE = "<answer>No Objects</answer>"


def answer(*entries: tuple[list[float], float]) -> str:
    items = ", ".join(f"{{'Position': {list(box)}, 'Confidence': {conf}}}" for box, conf in entries)
    return f"<think>looking</think><answer>[{items}]</answer>"


# (image_id, category) -> completion; boxes in the qwen2vl space of the fixture's images
QWEN_COMPLETIONS = {
    (1, "cat"): answer(([100, 100, 300, 400], 0.9), ([480, 520, 760, 990], 0.6), ([0, 0, 50, 50], 0.3)),
    (2, "cat"): answer(([0, 0, 210, 190], 0.8)),
    (2, "dog"): answer(([100, 100, 400, 400], 0.7), ([500, 500, 900, 900], 0.95)),  # 2nd: on the crowd box
    (3, "cat"): answer(([0, 0, 500, 500], 0.85)),  # a false positive on a negative query
    (1, "dog"): "<answer>[{'Position': [1, 2, 3], 'Confidence': 0.5}]</answer>",  # parse failure (strict)
}


def test_visual_rft_mode_drops_unusable_entries(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    completions = {(1, "cat"): "<answer>[{'Position': [300, 100, 100, 400], 'Confidence': 0.9}, "
                               "{'Position': [110, 100, 300, 400], 'Confidence': 'high'}, "
                               "{'Position': [100, 100, 300, 400], 'Confidence': 0.8}]</answer>"}
    results, counts = coco_results(rows_for(records, completions), records, mode="visual_rft")
    assert counts["invalid_predictions"] == 2  # the inverted box and the text confidence
    assert results == [{"image_id": 1, "category_id": 1, "bbox": [20.0, 10.0, 40.0, 30.0], "score": 0.8}]


def rows_for(records: list[Record], completions: dict) -> list[dict]:
    return [{"source": r.source, "solution": r.solution,
             "completion": completions.get((r.fields["image_id"], r.fields["category"]), NONE)} for r in records]


def pycocotools_eval(gt_path, results):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("negatives", [False, True])
def test_map_equals_pycocotools(tmp_path, negatives):
    path = write_fixture(tmp_path)
    records, _ = load_coco(path, negatives=negatives)
    rows = rows_for(records, QWEN_COMPLETIONS)
    metrics = detection_metrics(rows, records)
    results, counts = coco_results(rows, records)
    reference = pycocotools_eval(path, results)
    ours = [metrics[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")]
    theirs = [None if v < 0 else float(v) for v in reference.stats[:9]]
    # Same numbers up to one float ulp: pycocotools divides by tp + fp + np.spacing(1), faster-coco-eval not.
    assert ours == pytest.approx(theirs, abs=1e-12)
    precision = reference.eval["precision"]
    for k, name in enumerate(["cat", "dog"]):
        values = precision[:, :, k, 0, -1]
        assert metrics["per_category_AP"][name] == pytest.approx(values[values > -1].mean(), abs=1e-12)
    assert counts == {"queries": len(records), "parse_failures": 1, "invalid_predictions": 1,
                      "invalid_predictions/malformed": 1, "invalid_predictions/out_of_image": 0,
                      "invalid_predictions/confidence_out_of_range": 0, "detections": 7 if negatives else 6}
    assert metrics["ground_truth_boxes"] == 5  # the crowd box is an ignore region, not a target


def test_negative_queries_expose_false_positives(tmp_path):
    path = write_fixture(tmp_path)
    positives, _ = load_coco(path)
    everything, _ = load_coco(path, negatives=True)
    ap_pos = detection_metrics(rows_for(positives, QWEN_COMPLETIONS), positives)["per_category_AP"]["cat"]
    ap_all = detection_metrics(rows_for(everything, QWEN_COMPLETIONS), everything)["per_category_AP"]["cat"]
    # the 0.85 box on image 3 (no cat) is only seen when image 3 is asked about cats
    assert ap_all < ap_pos


def test_map_equals_pycocotools_in_pixel_space(tmp_path):
    path = write_fixture(tmp_path)
    records, _ = load_coco(path, box_space="pixels")
    completions = {(1, "cat"): answer(([20, 10, 60, 40], 0.9), ([101, 49, 149.5, 100], 0.4)),
                   (2, "dog"): answer(([12, 8, 41, 39], 0.7)), (1, "dog"): answer(([150, 0, 190, 20], 0.2))}
    rows = rows_for(records, completions)
    results, _ = coco_results(rows, records)
    assert results[0]["bbox"] == [20.0, 10.0, 40.0, 30.0]  # pixels come back unchanged, as xywh
    reference = pycocotools_eval(path, results)
    metrics = detection_metrics(rows, records)
    assert metrics["mAP"] == pytest.approx(float(reference.stats[0]), abs=1e-12)
    assert metrics["AP75"] == pytest.approx(float(reference.stats[2]), abs=1e-12)


def test_hand_computed_ap_and_open_vocabulary_groups(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    annotate_split(records, OVSplit("t", frozenset({"cat"}), frozenset({"dog"})))
    # cat: both boxes exact (IoU 1) -> AP 1.  dog: one of its two boxes exact, the other missed, and a
    # false positive ranked below the hit -> precision 1 up to recall 0.5: 51 of COCO's 101 recall points.
    completions = {(1, "cat"): answer(([100, 100, 300, 400], 0.9), ([500, 500, 750, 1000], 0.8)),
                   (2, "cat"): answer(([0, 0, 200, 200], 0.9)),
                   (2, "dog"): answer(([100, 100, 400, 400], 0.9), ([0, 0, 50, 50], 0.1))}
    metrics = detection_metrics(rows_for(records, completions), records)
    assert metrics["per_category_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(51 / 101)}
    assert metrics["AP_base"] == pytest.approx(1.0) and metrics["AP_novel"] == pytest.approx(51 / 101)
    assert metrics["AP_all"] == pytest.approx((1 + 51 / 101) / 2) == metrics["mAP"]
    assert metrics["AP50_novel"] == pytest.approx(51 / 101)


def test_empty_predictions_score_zero(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    metrics = detection_metrics(rows_for(records, {}), records)
    assert metrics["mAP"] == 0.0 and metrics["detections"] == 0
    assert metrics["per_category_AP"] == {"cat": 0.0, "dog": 0.0}


def test_lvis_mode_frequency_groups_and_not_exhaustive(tmp_path):
    data = copy.deepcopy(COCO_FIXTURE)
    for cat, freq in zip(data["categories"], "rcf"):
        cat["frequency"] = freq
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]
    data["annotations"].append({"id": 7, "image_id": 3, "category_id": 5, "bbox": [5, 5, 20, 20], "area": 400})
    negs = {1: ([5], []), 2: ([], [2]), 3: ([1], [])}  # image 2: dog annotated, but not exhaustively
    for image in data["images"]:
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = negs[image["id"]]
    records = load_records(f"lvis:{write_fixture(tmp_path, data, 'lvis.json')}?negatives=all", task="detection")
    completions = {(1, "cat"): answer(([100, 100, 300, 400], 0.9), ([500, 500, 750, 1000], 0.8)),
                   (2, "cat"): answer(([0, 0, 200, 200], 0.9)),
                   (2, "dog"): answer(([100, 100, 400, 400], 0.7), ([500, 500, 900, 900], 0.95)),
                   (3, "bird"): answer(([100, 62, 500, 312], 0.7))}
    metrics = detection_metrics(rows_for(records, completions), records)
    # dog: the 0.95 false positive is on a not-exhaustive category, so it is ignored -> 51/101, not less
    assert metrics["per_category_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(51 / 101),
                                          "bird": pytest.approx(1.0)}
    assert (metrics["APr"], metrics["APc"], metrics["APf"]) == pytest.approx((1.0, 51 / 101, 1.0))
    assert "AR300" in metrics and metrics["mAP"] == pytest.approx((2 + 51 / 101) / 3)


def test_rows_must_align_with_records(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    rows = rows_for(records, {})
    with pytest.raises(ValueError, match="4 prediction rows for 3 records"):
        detection_metrics(rows, records[:3])
    with pytest.raises(ValueError, match="row 0 is for"):
        detection_metrics(rows[::-1], records)
    published = [Record("x.png", "", r.solution, {"category": r.fields["category"]}, "hf:1") for r in records]
    with pytest.raises(ValueError, match=r"hf:1 lacks some\): evaluate on coco:"):
        detection_metrics(rows, published)


def test_ground_truth_rebuilt_from_records(tmp_path):
    records, _ = load_coco(write_fixture(tmp_path))
    gt = coco_ground_truth(records)
    original = {a["id"]: a for a in COCO_FIXTURE["annotations"]}
    assert sorted((a["image_id"], a["category_id"], tuple(a["bbox"]), a["area"], a["iscrowd"]) for a in gt["annotations"]) \
        == sorted((a["image_id"], a["category_id"], tuple(float(v) for v in a["bbox"]), float(a["area"]), a["iscrowd"])
                  for a in original.values())
    assert {(i["id"], i["width"], i["height"]) for i in gt["images"]} == {(1, 200.0, 100.0), (2, 100.0, 100.0)}
    assert json.dumps(gt)  # plain JSON: it can be written next to the predictions


def _grounding_rows():
    return [
        {"solution": "<answer> (0,0),(100,100) </answer>", "completion": "<think>a</think><answer>(0,0),(50,100)</answer>"},
        {"solution": "<answer> (0,0),(200,200) </answer>", "completion": "<think>b</think><answer>(100,100),(300,300)</answer>"},
        {"solution": "<answer> (500,500),(600,600) </answer>", "completion": "<think>c</think><answer>no idea</answer>"},
    ]


def test_grounding_metrics_by_hand():
    metrics = grounding_metrics(_grounding_rows())
    # IoUs 5000/10000, 10000/70000, 0 (parse failure); cIoU = (5000 + 10000) / (10000 + 70000 + 10000)
    assert metrics["gIoU"] == metrics["mIoU"] == pytest.approx((0.5 + 1 / 7) / 3)
    assert metrics["cIoU"] == pytest.approx(1 / 6)
    assert metrics["acc@0.5"] == pytest.approx(1 / 3) and metrics["parse_failures"] == 1


def test_grounding_cumulative_iou_in_pixels():
    # the first image is twice as wide: its areas count double in pixels, the per-sample IoUs do not change
    sizes = [(2000, 1000), (1000, 1000), (1000, 1000)]
    boxes = [[0, 0, 200, 100], [0, 0, 200, 200], [500, 500, 600, 600]]
    records = [Record("x.png", "", row["solution"], {"image_size": list(size), "box_pixels": box})
               for row, size, box in zip(_grounding_rows(), sizes, boxes)]
    metrics = grounding_metrics(_grounding_rows(), records)
    assert metrics["gIoU"] == pytest.approx((0.5 + 1 / 7) / 3)
    assert metrics["cIoU"] == pytest.approx((10000 + 10000) / (20000 + 70000 + 10000))
    assert np.isfinite(metrics["cIoU"])


# Boxes as a model might say them: past the image edge (qwen2vl > 1000 or < 0), a confidence outside
# 0..1 and an entry that is no box at all. Image 1 is 200x100 px, image 2 100x100.
EDGE_COMPLETIONS = {
    (1, "cat"): answer(([100, 100, 300, 400], 0.9), ([480, 520, 760, 1050], 0.6), ([-20, 0, 50, 50], 0.3)),
    (1, "dog"): answer(([740, -10, 1010, 210], 0.8)),  # its only box is past the edge
    (2, "dog"): answer(([100, 100, 400, 400], 0.7), ([120, 100, 400, 400], 1.5)),
    (2, "cat"): "<answer>[{'Position': [0, 0, 210, 190], 'Confidence': 0.8}, "
                "{'Position': [5, 5, 'x', 9], 'Confidence': 0.5}]</answer>",
}
EDGE_SAID = {  # what each answer says, converted here by hand to xywh pixels: (image, category id, box, score)
    (1, 1): [([20, 10, 40, 30], 0.9), ([96, 52, 56, 53], 0.6), ([-4, 0, 14, 5], 0.3)],
    (1, 2): [([148, -1, 54, 22], 0.8)],
    (2, 2): [([10, 10, 30, 30], 0.7), ([12, 10, 28, 30], 1.5)],
    (2, 1): [([0, 0, 21, 19], 0.8)],
}


@pytest.mark.parametrize("mode", ["strict", "visual_rft"])
def test_boxes_past_the_image_edge_are_scored_as_the_model_said_them(tmp_path, mode):
    path = write_fixture(tmp_path)
    records, _ = load_coco(path)
    said = [{"image_id": i, "category_id": c, "bbox": [float(v) for v in box], "score": s}
            for (i, c), entries in EDGE_SAID.items() for box, s in entries]
    reference = pycocotools_eval(path, said)  # pycocotools takes boxes past the edge as they are
    metrics = detection_metrics(rows_for(records, EDGE_COMPLETIONS), records, mode=mode)
    ours = [metrics[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")]
    assert ours == pytest.approx([None if v < 0 else float(v) for v in reference.stats[:9]], abs=1e-12)
    results, counts = coco_results(rows_for(records, EDGE_COMPLETIONS), records, mode=mode)
    assert sorted((r["image_id"], r["score"]) for r in results) == sorted((d["image_id"], d["score"]) for d in said)
    # strict calls (1, dog) a parse failure (its only box is outside the image), and still scores it
    assert counts["detections"] == 7 and counts["parse_failures"] == (1 if mode == "strict" else 0)
    # what the strict reward rejects is counted by kind; visual_rft's reward rejects only the non-box
    kinds = {"malformed": 1, "out_of_image": 3, "confidence_out_of_range": 1} if mode == "strict" else \
        {"malformed": 1, "out_of_image": 0, "confidence_out_of_range": 0}
    assert {k: counts[f"invalid_predictions/{k}"] for k in kinds} == kinds
    assert counts["invalid_predictions"] == sum(kinds.values())

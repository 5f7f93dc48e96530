import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.coco import coco_evaluate
from detkit.structures import ImageRecord


def det(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "scores": np.asarray(scores, float),
        "labels": np.asarray(labels, np.int64),
    }


def voc_like(images, class_names=("a", "b")):
    """images: (image_id, boxes internal xyxy, labels, difficult); no COCO json."""
    records = [ImageRecord(i, f"/nonexistent/{i}.jpg", 200, 100, b, lab, d) for i, b, lab, d in images]
    return DetectionDataset(records, list(class_names), native_offset=1.0)


# One GT (0,0)-(10,10), area 100, and a detection (0,0)-(10,6.2): IoU = 62/100 = 0.62.
# COCOeval matches at IoU >= t for t in .50:.05:.95, so it is a TP at .50, .55, .60 (precision
# 1 at all 101 recall points: AP 1) and a FP at the other 7 thresholds (recall stays 0: AP 0).
# AP@[.5:.95] = 3/10, AP50 = 1, AP75 = 0; AR100 = 3/10 likewise. The box is "small"
# (area 100 < 32^2): APs = 0.3; no medium or large objects: APm = APl = NaN.
HAND_GT = [[0.0, 0.0, 10.0, 10.0]]
HAND_DET = [[0.0, 0.0, 10.0, 6.2]]


def test_hand_checked_single_box():
    dataset = voc_like([("x", HAND_GT, [1], [False])])
    r = coco_evaluate(dataset, {"x": det(HAND_DET, [0.9], [1])})
    assert r["metric"] == "coco"
    assert r["mAP"] == pytest.approx(0.3, abs=1e-12)
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == 0.0
    assert r["AR100"] == pytest.approx(0.3, abs=1e-12) and r["AR1"] == pytest.approx(0.3, abs=1e-12)
    assert r["APs"] == pytest.approx(0.3, abs=1e-12)
    assert math.isnan(r["APm"]) and math.isnan(r["APl"])
    assert r["per_class"]["a"] == pytest.approx(0.3, abs=1e-12)
    assert math.isnan(r["per_class"]["b"])  # no ground truth of class b
    assert r["num_gt"] == {"a": 1, "b": 0}
    recall, precision = r["pr"]["a"]
    # at IoU .5; pycocotools divides by tp + fp + eps, hence approx
    assert recall.shape == (101,) and precision == pytest.approx(np.ones(101), abs=1e-12)


def test_perfect_detections_give_ap_one():
    images = [
        ("x", [[0, 0, 50, 40], [60, 10, 120, 90]], [1, 2], [False, False]),
        ("y", [[5, 5, 30, 30]], [1], [False]),
        ("z", np.zeros((0, 4)), [], []),
    ]
    dataset = voc_like(images)
    dets = {i: det(b, np.linspace(0.9, 0.5, len(lab)), lab) for i, b, lab, _ in images if len(lab)}
    r = coco_evaluate(dataset, dets)
    assert r["mAP"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert r["per_class"] == pytest.approx({"a": 1.0, "b": 1.0})


def test_no_detections_is_zero_not_a_crash():
    dataset = voc_like([("x", HAND_GT, [1], [False])])
    r = coco_evaluate(dataset, {})
    assert r["mAP"] == 0.0 and r["AP50"] == 0.0 and r["AR100"] == 0.0
    assert r["per_class"]["a"] == 0.0 and math.isnan(r["per_class"]["b"])


def test_difficult_becomes_crowd_and_is_neither_tp_nor_fp():
    # Object 1 normal, object 2 difficult. The higher-scored detection sits on the difficult
    # box: as iscrowd it is ignored, so AP stays 1. Counted as a FP it would put precision
    # 1/2 at recall 1 (AP 0.5).
    gt = [[0, 0, 10, 10], [50, 50, 70, 70]]
    dataset = voc_like([("x", gt, [1, 1], [False, True])])
    dets = {"x": det([[50, 50, 70, 70], [0, 0, 10, 10]], [0.9, 0.5], [1, 1])}
    r = coco_evaluate(dataset, dets)
    assert r["per_class"]["a"] == pytest.approx(1.0)
    assert r["num_gt"]["a"] == 1


def test_prints_nothing_unless_verbose(capsys):
    dataset = voc_like([("x", HAND_GT, [1], [False])])
    coco_evaluate(dataset, {"x": det(HAND_DET, [0.9], [1])})
    assert capsys.readouterr().out == ""
    coco_evaluate(dataset, {"x": det(HAND_DET, [0.9], [1])}, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def write_coco_json(tmp_path):
    # Non-contiguous category ids on purpose: label 1 "cat" = id 7, label 2 "dog" = id 3.
    data = {
        "images": [
            {"id": 42, "width": 200, "height": 100, "file_name": "a.jpg"},
            {"id": 17, "width": 200, "height": 100, "file_name": "b.jpg"},
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 7, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 17, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def coco_dataset(tmp_path):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(write_coco_json(tmp_path)))
    records = [
        ImageRecord(42, "a.jpg", 200, 100, [[10, 10, 50, 40]], [1], [False]),
        ImageRecord(17, "b.jpg", 200, 100, [[0, 0, 10, 10]], [2], [False]),
    ]
    return DetectionDataset(records, ["cat", "dog"], native_offset=0.0, coco=coco, label_to_cat_id={1: 7, 2: 3})


def test_coco_json_dataset_maps_labels_to_category_ids(tmp_path):
    dataset = coco_dataset(tmp_path)
    # cat found exactly; dog at IoU 0.62 (the hand-checked case): cat 1.0, dog 0.3.
    # Swapping the label -> category mapping would swap the two numbers.
    dets = {42: det([[10, 10, 50, 40]], [0.8], [1]), 17: det(HAND_DET, [0.7], [2])}
    r = coco_evaluate(dataset, dets)
    assert r["per_class"]["cat"] == pytest.approx(1.0)
    assert r["per_class"]["dog"] == pytest.approx(0.3, abs=1e-12)
    assert r["mAP"] == pytest.approx(0.65, abs=1e-12)
    assert r["AP50"] == pytest.approx(1.0)
    assert r["num_gt"] == {"cat": 1, "dog": 1}


def test_coco_json_dataset_wrong_class_is_not_a_match(tmp_path):
    dataset = coco_dataset(tmp_path)
    # the cat box labelled dog: a FP for dog, nothing for cat
    r = coco_evaluate(dataset, {42: det([[10, 10, 50, 40]], [0.8], [2])})
    assert r["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_coco_dataset_with_image_missing_from_json(tmp_path):
    dataset = coco_dataset(tmp_path)
    dataset.records.append(ImageRecord(99, "c.jpg", 10, 10))
    with pytest.raises(ValueError, match="image id 99 is not in its COCO json"):
        coco_evaluate(dataset, {})

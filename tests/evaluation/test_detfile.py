import json

import numpy as np
import pytest

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.detfile import (
    DetectionFileError,
    dets_to_json,
    load_detections,
    save_detections,
)
from detkit.structures import ImageRecord


def voc_dataset():
    records = [ImageRecord("000005", "/x/000005.jpg", 500, 375), ImageRecord("000007", "/x/000007.jpg", 500, 333)]
    return DetectionDataset(records, ["cat", "dog"], native_offset=1.0, name="voc_test")


def coco_dataset():
    records = [ImageRecord(42, "/x/a.jpg", 640, 480), ImageRecord(17, "/x/b.jpg", 640, 480)]
    return DetectionDataset(records, ["cat", "dog"], native_offset=0.0, label_to_cat_id={1: 7, 2: 3}, name="coco_test")


def write(tmp_path, entries, name="dets.json"):
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


def test_voc_entries_are_in_xml_coordinates():
    # internal (9, 19, 30, 40) is the XML box xmin=10, ymin=20, xmax=30, ymax=40:
    # bbox [xmin, ymin, xmax - xmin, ymax - ymin] = [10, 20, 20, 20]
    dets = {
        "000007": {"boxes": np.array([[9, 19, 30, 40]], np.float32), "scores": np.array([0.5]), "labels": np.array([2])}
    }
    assert dets_to_json(dets, voc_dataset()) == [
        {"image_id": "000007", "category_id": 2, "category": "dog", "bbox": [10.0, 20.0, 20.0, 20.0], "score": 0.5}
    ]


def test_coco_entries_use_json_ids():
    dets = {17: {"boxes": np.array([[1.5, 2, 11.5, 7]]), "scores": np.array([0.25]), "labels": np.array([1])}}
    assert dets_to_json(dets, coco_dataset()) == [
        {"image_id": 17, "category_id": 7, "category": "cat", "bbox": [1.5, 2.0, 10.0, 5.0], "score": 0.25}
    ]


@pytest.mark.parametrize("make", [voc_dataset, coco_dataset])
def test_round_trip_is_exact(tmp_path, make):
    dataset = make()
    rng = np.random.default_rng(0)
    dets = {}
    for rec in dataset.records:
        xy = rng.uniform(0, 300, (5, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(0.5, 90, (5, 2)).astype(np.float32)], 1)
        dets[rec.image_id] = {
            "boxes": boxes,
            "scores": rng.random(5).astype(np.float32),
            "labels": rng.integers(1, 3, 5),
        }
    path = tmp_path / "out" / "dets.json"
    save_detections(path, dets, dataset)
    loaded = load_detections(path, dataset)
    assert list(loaded) == [r.image_id for r in dataset.records]
    for image_id, d in dets.items():
        np.testing.assert_array_equal(loaded[image_id]["boxes"], d["boxes"].astype(np.float64))
        np.testing.assert_array_equal(loaded[image_id]["scores"], d["scores"].astype(np.float64))
        np.testing.assert_array_equal(loaded[image_id]["labels"], d["labels"])
        assert loaded[image_id]["labels"].dtype == np.int64


def test_empty_detections_round_trip(tmp_path):
    path = tmp_path / "empty.json"
    save_detections(path, {}, voc_dataset())
    assert json.loads(path.read_text()) == []
    assert load_detections(path, voc_dataset()) == {}


def test_load_by_category_name_and_id(tmp_path):
    path = write(
        tmp_path,
        [
            {"image_id": "000005", "category": "dog", "bbox": [10, 20, 20, 20], "score": 0.9},
            {"image_id": "000005", "category_id": 1, "bbox": [1, 1, 0, 0], "score": 0.1},
        ],
    )
    d = load_detections(path, voc_dataset())["000005"]
    # x1 = xmin - 1, y1 = ymin - 1, x2 = xmin + w, y2 = ymin + h; a one-pixel box (w = 0)
    np.testing.assert_array_equal(d["boxes"], [[9, 19, 30, 40], [0, 0, 1, 1]])
    np.testing.assert_array_equal(d["labels"], [2, 1])
    np.testing.assert_array_equal(d["scores"], [0.9, 0.1])


def test_coco_category_ids_map_to_labels(tmp_path):
    path = write(tmp_path, [{"image_id": 42, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}])
    d = load_detections(path, coco_dataset())[42]
    assert d["labels"].tolist() == [2]  # json id 3 = label 2 ("dog")
    np.testing.assert_array_equal(d["boxes"], [[0, 0, 5, 5]])


GOOD = {"image_id": "000005", "category": "cat", "bbox": [1, 1, 5, 5], "score": 0.5}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"dets\.json: not a JSON file"),
        ({"image_id": 1}, r"dets\.json: expected a JSON list of detections, got dict"),
        ([GOOD, 3], r"entry 1: expected an object"),
        ([GOOD, {"image_id": "000005", "category": "cat", "score": 0.5}], r"entry 1: missing key\(s\) bbox"),
        ([{"image_id": "000005", "bbox": [1, 1, 5, 5], "score": 0.5}], r"entry 0: missing key\(s\) category_id"),
        ([dict(GOOD, bbox=[1, 1, 5])], r"entry 0: bbox must be four finite numbers"),
        ([dict(GOOD, bbox=[1, 1, "5", 5])], r"entry 0: bbox must be four finite numbers"),
        ([dict(GOOD, bbox=[1, 1, 5, float("nan")])], r"entry 0: bbox must be four finite numbers"),
        # VOC: w = -1 is a zero-width box (x2 = x1); w = -2 would be x2 < x1
        ([GOOD, dict(GOOD, bbox=[5, 5, -2, 3])], r"entry 1: bbox .* negative width or height"),
        ([dict(GOOD, score="high")], r"entry 0: score must be a finite number"),
        ([dict(GOOD, category="cow")], r"entry 0: unknown category 'cow'"),
        (
            [{"image_id": "000005", "category_id": 9, "bbox": [1, 1, 5, 5], "score": 0.5}],
            r"entry 0: unknown category_id 9",
        ),
        ([dict(GOOD, category_id=2)], r"entry 0: category 'cat' disagrees with category_id 2"),
        (
            [dict(GOOD, image_id="999999"), dict(GOOD, image_id="000001")],
            r"none of the 2 detections' image ids is in dataset 'voc_test' \(e\.g\. '999999'\)",
        ),
    ],
)
def test_errors_name_file_and_entry(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(DetectionFileError, match=message) as info:
        load_detections(path, voc_dataset())
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_zero_width_voc_box_is_allowed(tmp_path):
    path = write(tmp_path, [dict(GOOD, bbox=[5, 5, -1, 3])])
    np.testing.assert_array_equal(load_detections(path, voc_dataset())["000005"]["boxes"], [[4, 4, 4, 8]])


def test_negative_width_in_coco(tmp_path):
    path = write(tmp_path, [{"image_id": 42, "category_id": 7, "bbox": [5, 5, -0.5, 3], "score": 1}])
    with pytest.raises(DetectionFileError, match="negative width"):
        load_detections(path, coco_dataset())


def test_missing_file(tmp_path):
    with pytest.raises(DetectionFileError, match="cannot read detection file"):
        load_detections(tmp_path / "nope.json", voc_dataset())


def test_some_unknown_image_ids_are_skipped_with_one_warning(tmp_path):
    path = write(tmp_path, [GOOD, dict(GOOD, image_id="x1"), dict(GOOD, image_id="x1"), dict(GOOD, image_id="x2")])
    with pytest.warns(UserWarning, match=r"skipped 3 of 4 detections on 2 image id\(s\) not in dataset") as record:
        dets = load_detections(path, voc_dataset())
    assert len(record) == 1
    assert list(dets) == ["000005"] and len(dets["000005"]["scores"]) == 1

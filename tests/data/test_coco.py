"""Tests of the COCO-json loader (detkit.data.coco): category mapping, iscrowd, box
conversion and every kind of malformed file."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli import main
from detkit.data.build import build_dataset
from detkit.data.coco import load_coco
from detkit.errors import DatasetError
from detkit.schema import DatasetConfig


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "detkit" and r.levelno == logging.WARNING]


def write_image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))
    return path


def make_coco(tmp_path: Path, images=None, annotations=None, categories=None, **extra) -> Path:
    """tmp_path/images/{1,2}.jpg (64x48) and tmp_path/ann.json; returns the json path."""
    if images is None:
        images = [
            {"id": 1, "file_name": "1.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "2.jpg", "width": 64, "height": 48},
        ]
    for im in images:
        name = str(im["file_name"])
        if not name.startswith("/") and ".." not in name:
            write_image(tmp_path / "images" / name)
    if categories is None:
        # Non-contiguous ids, listed out of order (as in COCO itself: 1..90 with gaps).
        categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 12, "name": "cow"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0.5, 1.5, 10.25, 4], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 12, "bbox": [30, 20, 10, 10]},
        ]
    data = {"images": images, "annotations": annotations, "categories": categories, **extra}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_boxes_labels_and_non_contiguous_category_ids(tmp_path):
    dataset = load_coco(make_coco(tmp_path), tmp_path / "images")
    # Labels follow category ids sorted: cat (3) -> 1, dog (7) -> 2, cow (12) -> 3.
    assert dataset.class_names == ["cat", "dog", "cow"]
    assert dataset.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    assert dataset.cat_id_to_label == {3: 1, 7: 2, 12: 3}
    assert dataset.native_offset == 0.0
    assert [r.image_id for r in dataset.records] == [1, 2]
    assert dataset.id_to_index == {1: 0, 2: 1}
    r1, r2 = dataset.records
    # [x, y, w, h] -> [x, y, x + w, y + h], continuous pixels, no offset.
    assert r1.boxes.tolist() == [[10, 5, 30, 35], [0.5, 1.5, 10.75, 5.5]]
    assert r1.labels.tolist() == [1, 2]
    assert r2.boxes.tolist() == [[30, 20, 40, 30]] and r2.labels.tolist() == [3]
    assert Path(r1.file_name) == tmp_path / "images" / "1.jpg"
    assert (r1.width, r1.height) == (64, 48)
    assert sorted(dataset.coco.getImgIds()) == [1, 2]  # the pycocotools index is built


def test_iscrowd_becomes_difficult(tmp_path):
    dataset = load_coco(make_coco(tmp_path), tmp_path / "images")
    assert dataset.records[0].difficult.tolist() == [False, True]
    assert dataset.records[1].difficult.tolist() == [False]  # iscrowd absent: not crowd


def test_classes_given_select_and_order_categories(tmp_path, detkit_log):
    dataset = load_coco(make_coco(tmp_path), tmp_path / "images", classes=["cow", "cat"])
    assert dataset.class_names == ["cow", "cat"]
    assert dataset.label_to_cat_id == {1: 12, 2: 3}
    assert dataset.records[0].labels.tolist() == [2]  # the dog is dropped
    assert dataset.records[1].labels.tolist() == [1]
    assert warnings_of(detkit_log) == ["ann: dropped annotations of classes not in the class list: 1 in 1 file (1.jpg)"]


def test_classes_not_among_the_categories(tmp_path):
    path = make_coco(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_coco(path, tmp_path / "images", classes=["cat", "horse", "emu"])
    assert str(err.value) == f"{path}: classes not among its categories: horse, emu"


def test_unknown_category_and_image_ids_are_dropped_and_counted(tmp_path, detkit_log):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]},
        {"id": 2, "image_id": 1, "category_id": 99, "bbox": [10, 5, 20, 30]},
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [10, 5, 20, 30]},
        {"id": 4, "image_id": 5, "category_id": 7, "bbox": [10, 5, 20, 30]},
    ]
    dataset = load_coco(make_coco(tmp_path, annotations=anns), tmp_path / "images")
    assert [len(r.boxes) for r in dataset.records] == [1, 0]
    assert warnings_of(detkit_log) == [
        "ann: dropped annotations with an unknown category_id: 1 in 1 file (1.jpg)",
        # Two annotations on the one unknown image: the count is of annotations.
        "ann: dropped annotations whose image_id is not in images: 2 in 1 file (ann.json)",
    ]


def test_zero_negative_and_outside_boxes(tmp_path, detkit_log):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 0, 30]},  # zero width
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 5, -4, 30]},  # negative width
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [50, 40, 20, 20]},  # clipped to 64x48
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [-10, 50, 5, 5]},  # fully outside
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48]},  # whole image
    ]
    dataset = load_coco(make_coco(tmp_path, annotations=anns), tmp_path / "images")
    assert dataset.records[0].boxes.tolist() == [[50, 40, 64, 48], [0, 0, 64, 48]]
    assert warnings_of(detkit_log) == [
        "ann: dropped inverted boxes (max < min): 1 in 1 file (1.jpg)",
        "ann: dropped zero-area boxes: 1 in 1 file (1.jpg)",
        "ann: clipped boxes extending outside the image: 1 in 1 file (1.jpg)",
        "ann: dropped boxes lying outside the image: 1 in 1 file (1.jpg)",
    ]


def test_filter_empty(tmp_path, detkit_log):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]}]
    path = make_coco(tmp_path, annotations=anns)
    assert len(load_coco(path, tmp_path / "images")) == 2
    detkit_log.clear()
    dataset = load_coco(path, tmp_path / "images", filter_empty=True)
    assert [r.image_id for r in dataset.records] == [1]
    assert warnings_of(detkit_log) == ["ann: skipped images without objects: 1 in 1 file (2.jpg)"]


def test_image_size_from_the_file_when_the_json_has_none(tmp_path):
    images = [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg", "width": 0, "height": 0}]
    dataset = load_coco(make_coco(tmp_path, images=images), tmp_path / "images")
    assert [(r.width, r.height) for r in dataset.records] == [(64, 48), (64, 48)]


def test_missing_and_unreadable_images_are_skipped(tmp_path, detkit_log):
    images = [
        {"id": 1, "file_name": "1.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "2.jpg"},
        {"id": 3, "file_name": "3.jpg", "width": 64, "height": 48},
    ]
    path = make_coco(tmp_path, images=images)
    (tmp_path / "images" / "2.jpg").write_bytes(b"garbage")  # no size in the json: header read
    (tmp_path / "images" / "3.jpg").unlink()
    dataset = load_coco(path, tmp_path / "images")
    assert [r.image_id for r in dataset.records] == [1]
    assert warnings_of(detkit_log) == [
        "ann: skipped unreadable images: 1 in 1 file (2.jpg)",
        "ann: skipped images that are missing: 1 in 1 file (3.jpg)",
    ]


def test_undecodable_images_are_skipped_at_load_even_with_sizes_in_the_json(tmp_path, detkit_log):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3, 4)]
    path = make_coco(tmp_path, images=images, annotations=[])
    (tmp_path / "images" / "2.jpg").write_bytes(bytes(range(256)) * 4)  # garbage
    (tmp_path / "images" / "3.jpg").write_bytes(b"")
    # A real JPEG without its last 20 bytes: kept (it decodes in part) and flagged.
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    (tmp_path / "images" / "4.jpg").write_bytes(cv2.imencode(".jpg", noise)[1].tobytes()[:-20])
    dataset = load_coco(path, tmp_path / "images")
    assert [r.image_id for r in dataset.records] == [1, 4]
    assert warnings_of(detkit_log) == [
        "ann: skipped unreadable images: 2 in 2 files (2.jpg, 3.jpg)",
        "ann: decoded partially (truncated image data): 1 in 1 file (4.jpg)",
    ]
    assert dataset[1][0].shape == (3, 48, 64)


@pytest.mark.parametrize("name", ["../secret.jpg", "sub/../../secret.jpg", "ABSOLUTE"])
def test_image_path_escaping_img_dir_is_skipped(tmp_path, detkit_log, name):
    secret = write_image(tmp_path / "secret.jpg")
    if name == "ABSOLUTE":
        name = str(secret)
    images = [
        {"id": 1, "file_name": "1.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": name, "width": 64, "height": 48},
    ]
    dataset = load_coco(make_coco(tmp_path, images=images), tmp_path / "images")
    assert [r.image_id for r in dataset.records] == [1]
    assert warnings_of(detkit_log) == [
        f"ann: skipped images whose path escapes the image folder: 1 in 1 file ({Path(name).name})"
    ]


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_coco(tmp_path / "nope.json", tmp_path)
    assert str(err.value) == f"COCO annotation file not found: {tmp_path / 'nope.json'}"
    path = make_coco(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_coco(path, tmp_path / "imgs")
    assert str(err.value) == f"image folder does not exist: {tmp_path / 'imgs'}"


BAD_FILES = [
    ('{"images": [], "annotations": [}', "not valid JSON (line 1: Expecting value)"),
    ("[1, 2]", "not a COCO json (top level must be an object)"),
    ('{"images": [], "categories": []}', "not a COCO json (missing or non-list 'annotations')"),
    ('{"images": {}, "annotations": [], "categories": []}', "not a COCO json (missing or non-list 'images')"),
    ({"images": [{"file_name": "1.jpg"}]}, "images[0] needs 'id' and 'file_name'"),
    ({"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "2.jpg"}]}, "images[1].id 1 is used twice"),
    ({"images": [{"id": [1], "file_name": "1.jpg"}]}, "images[0].id must be an integer or a string, got [1]"),
    ({"images": [{"id": 1, "file_name": "1.jpg", "width": "wide"}]}, "images[0].width must be a number, got 'wide'"),
    ({"categories": [{"id": 1}]}, "categories[0] needs 'id' and 'name'"),
    ({"categories": [{"id": "1", "name": "cat"}]}, "categories[0].id must be an integer, got '1'"),
    ({"categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]}, "categories[1].id 1 is used twice"),
    ({"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]}, "category name 'cat' is used twice"),
    (
        {"annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}]},
        "annotations[0] needs 'image_id', 'category_id' and 'bbox'",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}]},
        "annotations[0].bbox must be 4 numbers [x, y, w, h], got [1, 2, 3]",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 2, "3", 4]}]},
        "annotations[0].bbox must be 4 numbers [x, y, w, h], got [1, 2, '3', 4]",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 2, True, 4]}]},
        "annotations[0].bbox must be 4 numbers [x, y, w, h], got [1, 2, True, 4]",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3, "bbox": list(range(40))}]},
        # A long value is cut to 60 characters: the message stays one readable line.
        "annotations[0].bbox must be 4 numbers [x, y, w, h], got "
        "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16...",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3.5, "bbox": [1, 2, 3, 4]}]},
        "annotations[0].category_id must be an integer, got 3.5",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": "3", "bbox": [1, 2, 3, 4]}]},
        "annotations[0].category_id must be an integer, got '3'",
    ),
    (
        {"annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 2}]},
        "annotations[0].iscrowd must be 0 or 1, got 2",
    ),
    (
        {
            "annotations": [
                {"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]},
                {"id": 5, "image_id": 1, "category_id": 3, "bbox": [5, 6, 3, 4]},
            ]
        },
        "annotations[1].id 5 is used twice",
    ),
    (
        {"annotations": [{"id": [5], "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}]},
        "annotations[0].id must be an integer or a string, got [5]",
    ),
]


@pytest.mark.parametrize("content,message", BAD_FILES)
def test_malformed_json_is_one_line_naming_the_file(tmp_path, content, message):
    if isinstance(content, dict):
        base = {
            "images": [{"id": 1, "file_name": "1.jpg"}],
            "annotations": [],
            "categories": [{"id": 3, "name": "cat"}],
        }
        content = json.dumps({**base, **content})
    path = tmp_path / "ann.json"
    path.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as err:
        load_coco(path, tmp_path / "images")
    assert str(err.value) == f"{path}: {message}"


def test_integral_float_ids_are_read_as_integers(tmp_path):
    # Some exporters write every number as a float; 3.0 is category 3.
    anns = [{"id": 1, "image_id": 1, "category_id": 3.0, "bbox": [10, 5, 20, 30]}]
    cats = [{"id": 3.0, "name": "cat"}, {"id": 7, "name": "dog"}]
    dataset = load_coco(make_coco(tmp_path, annotations=anns, categories=cats), tmp_path / "images")
    assert dataset.label_to_cat_id == {1: 3, 2: 7}
    assert all(type(c) is int for c in dataset.label_to_cat_id.values())
    assert dataset.records[0].labels.tolist() == [1]


def test_build_dataset_defaults_img_dir_to_the_json_folder(tmp_path):
    images = [{"id": 1, "file_name": "images/1.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]}]
    path = make_coco(tmp_path, images=images, annotations=anns)
    write_image(tmp_path / "images" / "1.jpg")
    dataset = build_dataset(DatasetConfig(format="coco", ann_file=str(path)))
    assert Path(dataset.records[0].file_name) == tmp_path / "images" / "1.jpg"
    dataset = build_dataset(DatasetConfig(format="coco", ann_file=str(path), img_dir=str(tmp_path)))
    assert dataset.class_names == ["cat", "dog", "cow"] and dataset.coco is not None


def test_cli_reports_a_malformed_json_in_one_line(tmp_path, capsys):
    path = tmp_path / "ann.json"
    path.write_text('{"images": [}')
    (tmp_path / "data.yaml").write_text(f"format: coco\nann_file: {path}\n")
    assert main(["data", "check", str(tmp_path / "data.yaml")]) == 2
    assert capsys.readouterr().err == f"detkit: error: {path}: not valid JSON (line 1: Expecting value)\n"


def test_minimal_annotations_get_the_fields_coco_evaluation_needs(tmp_path):
    # Hand-made and exported files often omit id, area and iscrowd; pycocotools' COCOeval
    # reads all three. They are filled in memory (box area, 0, fresh ids after the largest).
    from detkit.evaluation.coco import coco_evaluate

    anns = [
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]},
        {"image_id": 2, "category_id": 7, "bbox": [30, 20, 10, 10], "area": 55.0},
        {"image_id": 2, "category_id": 7, "bbox": [2, 2, 8, 8]},
    ]
    path = make_coco(tmp_path, annotations=anns, categories=[{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}])
    dataset = load_coco(path, tmp_path / "images")
    stored = sorted(dataset.coco.dataset["annotations"], key=lambda a: a["id"])
    assert [(a["id"], a["area"], a["iscrowd"]) for a in stored] == [(4, 600.0, 0), (5, 55.0, 0), (6, 64.0, 0)]
    assert json.loads(path.read_text())["annotations"] == anns  # the user's file is untouched
    # Exact detections of every box: AP 1 for both classes (a crash or a lost box would not be).
    dets = {
        r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.labels)), "labels": r.labels} for r in dataset.records
    }
    result = coco_evaluate(dataset, dets)
    assert result["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}

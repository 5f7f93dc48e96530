"""Tests of the Pascal VOC loader (detkit.data.voc) on the real BCCD devkit folder and on
small VOC folders written into tmp_path, including every kind of broken input, and of
``detkit evaluate`` on such a folder."""

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import detkit.data.voc as voc_mod
from detkit.cli import main
from detkit.data.build import DATASET_FORMATS, build_dataset
from detkit.data.voc import case_variants, load_voc
from detkit.errors import DatasetError, ImageReadError
from detkit.schema import DatasetConfig


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "detkit" and r.levelno == logging.WARNING]


def shared_dir() -> Path:
    env = os.environ.get("DETKIT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared"


BCCD = shared_dir() / "data" / "BCCD"


@pytest.fixture(scope="module")
def bccd_root() -> Path:
    if not (BCCD / "ImageSets" / "Main" / "trainval.txt").is_file():
        pytest.skip(f"BCCD not found under {BCCD} (set DETKIT_SHARED)")
    return BCCD


# -- writing small VOC folders ----------------------------------------------------------------
def write_xml(path: Path, objects=(), filename=None, size=(64, 48)) -> Path:
    """objects: (name, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult); filename None
    writes <stem>.jpg, "" writes no <filename>; size None writes no <size>."""
    parts = ["<annotation>", "<folder>images</folder>"]
    if filename is None:
        filename = path.stem + ".jpg"
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def write_image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), 128, np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def make_plain(root: Path, ids, ann="annotations", img="images", ext=".jpg", objects=None) -> Path:
    """A plain layout: one 64x48 image and one XML per id, each with one 'cat' box."""
    for image_id in ids:
        objs = objects if objects is not None else [("cat", (11, 11, 30, 30), 0)]
        write_xml(root / ann / f"{image_id}.xml", objs, filename=f"{image_id}{ext}")
        write_image(root / img / f"{image_id}{ext}")
    return root


def ids_of(dataset):
    return [r.image_id for r in dataset.records]


# -- the real BCCD devkit folder -------------------------------------------------------------
def test_bccd_split_sizes(bccd_root):
    sizes = {s: len(load_voc(bccd_root, s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 205, "val": 87, "trainval": 292, "test": 72}
    train, val = set(ids_of(load_voc(bccd_root, "train"))), set(ids_of(load_voc(bccd_root, "val")))
    assert not train & val
    assert train | val == set(ids_of(load_voc(bccd_root, "trainval")))


def test_bccd_classes_counts_and_one_summary_warning(bccd_root, detkit_log):
    dataset = load_voc(bccd_root)
    assert len(dataset) == 364
    assert dataset.class_names == ["Platelets", "RBC", "WBC"]  # inferred, sorted
    assert dataset.native_offset == 1.0
    labels = np.concatenate([r.labels for r in dataset.records])
    counts = {name: int((labels == k).sum()) for k, name in enumerate(dataset.class_names, start=1)}
    # The XML holds RBC 4155, WBC 372, Platelets 361; two RBC boxes are clicks without a drag.
    assert counts == {"Platelets": 361, "RBC": 4155 - 2, "WBC": 372}
    assert not np.concatenate([r.difficult for r in dataset.records]).any()
    assert warnings_of(detkit_log) == [
        "BCCD:all: dropped zero-area boxes: 2 in 2 files (BloodImage_00338.xml, BloodImage_00343.xml)"
    ]
    assert dataset.problems.count("dropped zero-area boxes") == 2


def test_bccd_box_is_converted_from_one_based_inclusive(bccd_root):
    dataset = load_voc(bccd_root, "val")
    rec = dataset.records[dataset.id_to_index["BloodImage_00338"]]
    assert (rec.width, rec.height) == (640, 480)
    assert Path(rec.file_name) == bccd_root / "JPEGImages" / "BloodImage_00338.jpg"
    # First object: RBC xmin 453 ymin 81 xmax 555 ymax 182 -> (xmin-1, ymin-1, xmax, ymax).
    assert rec.boxes.dtype == np.float32
    assert rec.boxes[0].tolist() == [452.0, 80.0, 555.0, 182.0]
    assert rec.labels[0] == dataset.class_names.index("RBC") + 1 == 2
    # 14 objects in the file, the 13th (504, 337, 504, 337) is the dropped zero-area one.
    assert len(rec.boxes) == 13
    assert [503.0, 336.0, 504.0, 337.0] not in rec.boxes.tolist()


# -- plain layouts ---------------------------------------------------------------------------
def test_plain_layout_split_by_split_file(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b", "c", "d"])
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("d\nb\n\n")
    dataset = load_voc(root, "train", split_file="splits/train.txt")
    assert ids_of(dataset) == ["d", "b"]  # the list's order
    assert dataset.class_names == ["cat"]
    rec = dataset.records[0]
    assert rec.boxes.tolist() == [[10.0, 10.0, 30.0, 30.0]]
    assert Path(rec.file_name) == root / "images" / "d.jpg"
    assert (rec.width, rec.height) == (64, 48)


def test_plain_layout_holdout_is_seeded_disjoint_and_complete(tmp_path):
    ids = [f"im{i:02d}" for i in range(10)]
    root = make_plain(tmp_path / "ds", ids)
    test = ids_of(load_voc(root, "test", holdout=0.3, seed=0))
    train = ids_of(load_voc(root, "train", holdout=0.3, seed=0))
    assert len(test) == 3 and len(train) == 7
    assert not set(test) & set(train)
    assert sorted(test + train) == ids
    # Pinned: a split must not change under an experiment when detkit is updated.
    assert test == ["im02", "im04", "im06"]  # sorted(default_rng(0).permutation(10)[:3])
    assert ids_of(load_voc(root, "val", holdout=0.3, seed=0)) == test  # val = test's images
    assert ids_of(load_voc(root, "test", holdout=0.3, seed=0)) == test  # same seed, same split
    assert ids_of(load_voc(root, "test", holdout=0.3, seed=1)) != test
    assert ids_of(load_voc(root, "all", holdout=0.3, seed=0)) == ids


def test_plain_layout_without_split_rule_names_the_options(tmp_path):
    root = make_plain(tmp_path / "ds", ["a"])
    with pytest.raises(DatasetError) as err:
        load_voc(root, "train")
    assert str(err.value) == (
        f"{root}: split 'train' needs split_file, ImageSets/Main/train.txt, or holdout in (0, 1) (got 0.0)"
    )


@pytest.mark.parametrize(
    "ann,img",
    [
        ("annotations", "images"),
        ("Annotations", "images"),
        ("annotations", "JPEGImages"),
        ("Annotations", "JPEGImages"),
    ],
)
def test_layout_folders_are_found_by_name(tmp_path, ann, img):
    root = make_plain(tmp_path / "ds", ["a", "b"], ann=ann, img=img)
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a", "b"]
    assert Path(dataset.records[0].file_name) == root / img / "a.jpg"


def test_ann_dir_and_img_dir_given_explicitly(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b"], ann="labels/xml", img="pics")
    dataset = load_voc(root, ann_dir="labels/xml", img_dir="pics")
    assert ids_of(dataset) == ["a", "b"]
    # Without root: the two folders as they are.
    dataset = load_voc(ann_dir=root / "labels" / "xml", img_dir=root / "pics")
    assert ids_of(dataset) == ["a", "b"]
    assert Path(dataset.records[1].file_name) == root / "pics" / "b.jpg"
    with pytest.raises(DatasetError, match="needs both ann_dir and img_dir"):
        load_voc(root, ann_dir="labels/xml")
    with pytest.raises(DatasetError) as err:
        load_voc(root, ann_dir="labels/xml", img_dir="nope")
    assert str(err.value) == f"images folder does not exist: {root / 'nope'}"


def test_images_with_other_extensions(tmp_path):
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0)], filename="")  # no hint
    write_image(root / "images" / "a.png")
    write_xml(root / "annotations" / "b.xml", [("cat", (1, 1, 5, 5), 0)], filename="b.jpg")  # stale
    write_image(root / "images" / "b.JPG")
    dataset = load_voc(root)
    assert [Path(r.file_name).name for r in dataset.records] == ["a.png", "b.JPG"]


def test_xml_filename_that_differs_from_the_stem(tmp_path):
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0)], filename="photo_001.jpg")
    write_image(root / "images" / "photo_001.jpg", 40, 30)
    write_image(root / "images" / "a.jpg")  # the stem's image loses to the annotation's own
    dataset = load_voc(root)
    assert dataset.records[0].image_id == "a"
    assert Path(dataset.records[0].file_name) == root / "images" / "photo_001.jpg"


def test_size_is_read_from_the_image_when_the_xml_has_none(tmp_path):
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0)], size=None)
    write_image(root / "images" / "a.jpg", 40, 30)
    rec = load_voc(root).records[0]
    assert (rec.width, rec.height) == (40, 30)


def test_difficult_flag_is_kept(tmp_path):
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0), ("dog", (3, 3, 9, 9), 1)])
    write_image(root / "images" / "a.jpg")
    rec = load_voc(root).records[0]
    assert rec.difficult.tolist() == [False, True]
    assert rec.labels.tolist() == [1, 2]


def test_classes_given_fix_the_label_order_and_drop_others(tmp_path, detkit_log):
    root = tmp_path / "ds"
    write_xml(
        root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0), ("dog", (3, 3, 9, 9), 0), ("cow", (2, 2, 4, 4), 0)]
    )
    write_image(root / "images" / "a.jpg")
    dataset = load_voc(root, classes=["dog", "cat"])
    assert dataset.class_names == ["dog", "cat"]
    assert dataset.records[0].labels.tolist() == [2, 1]
    assert warnings_of(detkit_log) == ["ds:all: dropped objects of classes not in the class list: 1 in 1 file (a.xml)"]
    with pytest.raises(DatasetError, match="duplicate class names"):
        load_voc(root, classes=["dog", "dog"])


def test_a_class_list_matching_no_object_is_an_error_naming_the_found_classes(tmp_path):
    # The usual cause: a recipe's class list (e.g. BCCD's) inherited by a run on other data.
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "a.xml", [("cat", (1, 1, 5, 5), 0), ("dog", (3, 3, 9, 9), 0)])
    write_xml(root / "annotations" / "b.xml", [])
    write_image(root / "images" / "a.jpg")
    write_image(root / "images" / "b.jpg")
    with pytest.raises(DatasetError) as err:
        load_voc(root, classes=["RBC", "WBC"])
    assert str(err.value) == (
        f"ds:all: no object in {root / 'annotations'} is of the classes ['RBC', 'WBC']; "
        "found ['cat', 'dog'] (set classes to these, or to null to infer them)"
    )
    # One listed class present is enough: the rest is the counted skip of the test above.
    assert load_voc(root, classes=["cat"]).records[0].labels.tolist() == [1]


def test_every_split_of_a_folder_gets_the_same_inferred_classes(tmp_path):
    root = make_plain(tmp_path / "ds", ["a"])
    write_xml(root / "annotations" / "b.xml", [("zebra", (1, 1, 5, 5), 0)])
    write_image(root / "images" / "b.jpg")
    (root / "a.txt").write_text("a\n")
    assert load_voc(root, split_file="a.txt").class_names == ["cat", "zebra"]


def test_build_dataset_uses_the_voc_loader(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b", "c"])
    (root / "val.txt").write_text("c\n")
    assert set(DATASET_FORMATS) == {"voc", "coco", "shapes"}
    cfg = DatasetConfig(format="voc", root=str(root), split="val", split_file="val.txt")
    dataset = build_dataset(cfg, classes=["dog", "cat"], transforms="T", name="test")
    assert ids_of(dataset) == ["c"]
    assert dataset.class_names == ["dog", "cat"] and dataset.records[0].labels.tolist() == [2]
    assert dataset.transforms == "T" and dataset.name == "test"


# -- broken input: one test per case ---------------------------------------------------------
def test_malformed_xml_is_skipped_and_counted(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a", "b"])
    (root / "annotations" / "c.xml").write_text("<annotation><object><name>cat</name>")
    (root / "annotations" / "d.xml").write_text("<html><body>not voc</body></html>")
    write_image(root / "images" / "c.jpg")
    write_image(root / "images" / "d.jpg")
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a", "b"]
    assert warnings_of(detkit_log) == ["ds:all: skipped malformed annotation files: 2 in 2 files (c.xml, d.xml)"]


def test_missing_image_is_skipped_and_counted(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a", "b", "c"])
    (root / "images" / "b.jpg").unlink()
    assert ids_of(load_voc(root)) == ["a", "c"]
    assert warnings_of(detkit_log) == ["ds:all: skipped annotations whose image is missing: 1 in 1 file (b.xml)"]


def write_truncated_jpeg(path: Path, width: int = 64, height: int = 48, cut: int = 20) -> Path:
    """A real JPEG of noise without its last ``cut`` bytes (an interrupted download)."""
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", noise)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes()[:-cut])
    return path


def test_undecodable_images_are_skipped_at_load_and_counted(tmp_path, detkit_log):
    # Sizes are in the XML, so nothing needs the images for the annotations: the loader's
    # image check still finds the broken ones before anything trains on them.
    root = make_plain(tmp_path / "ds", ["a", "b", "c", "d"])
    (root / "images" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "images" / "c.jpg").write_bytes(b"")
    (root / "images" / "d.jpg").write_text("a text file named .jpg\n")
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a"]
    assert warnings_of(detkit_log) == ["ds:all: skipped unreadable images: 3 in 3 files (b.jpg, c.jpg, d.jpg)"]
    assert dataset.problems.as_dict()["skipped unreadable images"]["files"] == [
        str(root / "images" / f"{stem}.jpg") for stem in "bcd"
    ]


def test_truncated_image_is_kept_and_flagged_at_load(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a", "b"])
    write_truncated_jpeg(root / "images" / "b.jpg")
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a", "b"]
    assert warnings_of(detkit_log) == ["ds:all: decoded partially (truncated image data): 1 in 1 file (b.jpg)"]
    image, target = dataset[1]
    assert image.shape == (3, 48, 64) and target.boxes.tolist() == [[10.0, 10.0, 30.0, 30.0]]
    dataset[1]
    assert len(warnings_of(detkit_log)) == 1  # reading it (every epoch) warns no more


def test_image_spoiled_after_loading_raises_naming_the_file(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b"])
    dataset = load_voc(root)
    (root / "images" / "b.jpg").write_bytes(b"garbage")  # replaced while training runs
    assert dataset[0][0].shape == (3, 48, 64)
    with pytest.raises(ImageReadError) as err:
        dataset[1]
    assert str(err.value) == f"cannot decode image: {root / 'images' / 'b.jpg'} (not an image or corrupt)"


def test_unreadable_image_without_size_is_skipped_and_counted(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a"])
    write_xml(root / "annotations" / "b.xml", [("cat", (1, 1, 5, 5), 0)], size=None)
    (root / "images" / "b.jpg").write_bytes(b"garbage")
    assert ids_of(load_voc(root)) == ["a"]
    assert warnings_of(detkit_log) == ["ds:all: skipped unreadable images: 1 in 1 file (b.jpg)"]


def test_zero_size_and_inverted_boxes_are_dropped_and_counted(tmp_path, detkit_log):
    root = tmp_path / "ds"
    write_xml(
        root / "annotations" / "a.xml",
        [
            ("cat", (11, 11, 30, 30), 0),  # kept
            ("cat", (20, 5, 20, 25), 0),  # xmin == xmax: zero width
            ("cat", (5, 7, 25, 7), 0),  # ymin == ymax: zero height
            ("cat", (30, 5, 10, 25), 0),  # xmax < xmin: inverted
            ("dog", (2, 2, 3, 3), 1),  # kept: 2 pixels wide in VOC's inclusive pixels
        ],
    )
    write_image(root / "images" / "a.jpg")
    rec = load_voc(root).records[0]
    assert rec.boxes.tolist() == [[10, 10, 30, 30], [1, 1, 3, 3]]
    assert rec.labels.tolist() == [1, 2] and rec.difficult.tolist() == [False, True]
    assert warnings_of(detkit_log) == [
        "ds:all: dropped inverted boxes (max < min): 1 in 1 file (a.xml)",
        "ds:all: dropped zero-area boxes: 2 in 1 file (a.xml)",
    ]


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path, detkit_log):
    root = tmp_path / "ds"
    write_xml(
        root / "annotations" / "a.xml",
        [
            ("cat", (50, 40, 70, 60), 0),  # sticks out right and bottom of 64x48: clipped
            ("cat", (0, 1, 10, 10), 0),  # xmin 0 (a 0-based tool) -> x1 = -1: clipped
            ("cat", (80, 10, 90, 20), 0),  # entirely to the right: dropped (counted once)
            ("cat", (1, 1, 64, 48), 0),  # exactly the whole image: untouched
        ],
    )
    write_image(root / "images" / "a.jpg")
    rec = load_voc(root).records[0]
    assert rec.boxes.tolist() == [[49, 39, 64, 48], [0, 0, 10, 10], [0, 0, 64, 48]]
    assert warnings_of(detkit_log) == [
        "ds:all: clipped boxes extending outside the image: 2 in 1 file (a.xml)",
        "ds:all: dropped boxes lying outside the image: 1 in 1 file (a.xml)",
    ]


def test_images_without_objects_are_kept_unless_filter_empty(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a"])
    write_xml(root / "annotations" / "b.xml", [])
    write_image(root / "images" / "b.jpg")
    write_xml(root / "annotations" / "c.xml", [("cat", (5, 5, 5, 9), 0)])  # its only box dropped
    write_image(root / "images" / "c.jpg")
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a", "b", "c"]
    assert dataset.records[1].boxes.shape == (0, 4) and dataset.records[1].labels.dtype == np.int64
    detkit_log.clear()
    dataset = load_voc(root, filter_empty=True)
    assert ids_of(dataset) == ["a"]
    assert "ds:all: skipped images without objects: 2 in 2 files (b.xml, c.xml)" in warnings_of(detkit_log)


@pytest.mark.parametrize("hint", ["../../secret.jpg", "../images/../../secret.jpg", "ABSOLUTE"])
def test_xml_filename_escaping_the_root_is_skipped_and_never_read(tmp_path, detkit_log, monkeypatch, hint):
    root = make_plain(tmp_path / "ds", ["a"])
    secret = write_image(tmp_path / "secret.jpg")
    if hint == "ABSOLUTE":
        hint = str(secret)
    write_xml(root / "annotations" / "evil.xml", [("cat", (1, 1, 5, 5), 0)], filename=hint, size=None)
    write_image(root / "images" / "evil.jpg")  # even a harmless fallback is not taken
    touched = []
    real_find, real_check = voc_mod.find_image, voc_mod.usable_image
    monkeypatch.setattr(voc_mod, "find_image", lambda d, stem, h=None: touched.append(stem) or real_find(d, stem, h))
    monkeypatch.setattr(voc_mod, "usable_image", lambda p, log: touched.append(str(p)) or real_check(p, log))
    dataset = load_voc(root)
    assert ids_of(dataset) == ["a"]
    # Nothing was looked up, let alone opened, for evil.xml.
    assert touched == ["a", str(root / "images" / "a.jpg")]
    assert warnings_of(detkit_log) == [
        "ds:all: skipped annotations whose image path escapes the dataset root: 1 in 1 file (evil.xml)"
    ]


def test_split_ids_escaping_the_annotation_folder_are_skipped(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a"])
    write_xml(tmp_path / "outside.xml", [("cat", (1, 1, 5, 5), 0)])  # would parse fine
    write_image(root / "images" / "outside.jpg")
    (root / "list.txt").write_text("a\n../../outside\n")
    dataset = load_voc(root, split_file="list.txt", classes=["cat"])
    assert ids_of(dataset) == ["a"]
    assert warnings_of(detkit_log) == [
        "ds:all: skipped ids whose annotation path escapes the annotations folder: 1 in 1 file (outside)"
    ]


def test_split_ids_without_annotation_and_listed_twice_are_counted(tmp_path, detkit_log):
    root = make_plain(tmp_path / "ds", ["a", "b"])
    (root / "list.txt").write_text("a\nzz\na\nb\n")
    assert ids_of(load_voc(root, split_file="list.txt")) == ["a", "b"]
    assert warnings_of(detkit_log) == [
        "ds:all: skipped ids without an annotation file: 1 in 1 file (zz.xml)",
        "ds:all: skipped ids listed twice in the split: 1 in 1 file (a)",
    ]


def test_dataset_root_that_does_not_exist(tmp_path):
    root = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetError) as err:
        load_voc(root, "train")
    assert str(err.value) == f"dataset root does not exist or is not a folder: {root}"


def test_folder_that_is_not_a_voc_dataset(tmp_path):
    (tmp_path / "ds" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        load_voc(tmp_path / "ds")
    assert str(err.value).startswith(f"{tmp_path / 'ds'}: not a VOC dataset (expected Annotations/ + JPEGImages/")
    assert "\n" not in str(err.value)


def test_devkit_split_file_that_does_not_exist_lists_the_available_ones(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b"], ann="Annotations", img="JPEGImages")
    main_dir = root / "ImageSets" / "Main"
    main_dir.mkdir(parents=True)
    for name, text in (("train", "a\n"), ("test", "b\n"), ("cat_train", "a 1\n")):
        (main_dir / f"{name}.txt").write_text(text)
    assert ids_of(load_voc(root, "train")) == ["a"]
    with pytest.raises(DatasetError) as err:
        load_voc(root, "val")
    assert str(err.value) == f"split file not found: {main_dir / 'val.txt'} (available: test, train)"


def test_devkit_without_imagesets_suggests_holdout(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b"], ann="Annotations", img="JPEGImages")
    with pytest.raises(DatasetError) as err:
        load_voc(root, "train")
    assert str(err.value) == (
        f"split file not found: {root / 'ImageSets' / 'Main' / 'train.txt'} "
        "(set holdout: 0.2 to split by a seeded fraction)"
    )
    # A devkit folder without ImageSets splits by holdout as well: 1 of 2 held out.
    test, train = ids_of(load_voc(root, "test", holdout=0.5)), ids_of(load_voc(root, "train", holdout=0.5))
    assert len(test) == len(train) == 1 and sorted(test + train) == ["a", "b"]


def test_explicit_split_file_that_does_not_exist(tmp_path):
    root = make_plain(tmp_path / "ds", ["a"])
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "splits" / "val_small.txt").write_text("a\n")
    with pytest.raises(DatasetError) as err:
        load_voc(root, split_file="splits/tets.txt")
    assert str(err.value) == f"split file not found: {root / 'splits' / 'tets.txt'} (available: train, val_small)"
    with pytest.raises(DatasetError) as err:
        load_voc(root, split_file="lists/train.txt")
    assert str(err.value) == (
        f"split file not found: {root / 'lists' / 'train.txt'} (no .txt split lists in {root / 'lists'})"
    )


def test_empty_split_file(tmp_path):
    root = make_plain(tmp_path / "ds", ["a"])
    (root / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError) as err:
        load_voc(root, split_file="empty.txt")
    assert str(err.value) == f"split file lists no image ids: {root / 'empty.txt'}"


def test_no_usable_image_is_one_line_naming_the_first_problem(tmp_path):
    root = make_plain(tmp_path / "ds", ["a", "b"])
    for p in (root / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError) as err:
        load_voc(root)
    assert str(err.value) == (
        f"ds:all: no usable images in {root / 'annotations'} (ds:all: skipped "
        "annotations whose image is missing: 2 in 2 files (a.xml, +1 more))"
    )


# -- through the command line ----------------------------------------------------------------
def test_cli_names_the_missing_dataset_root(tmp_path, capsys):
    (tmp_path / "data.yaml").write_text("format: voc\nroot: missing_folder\nsplit: test\n")
    assert main(["data", "check", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"detkit: error: dataset root does not exist or is not a folder: {tmp_path / 'missing_folder'}\n"


def test_cli_names_the_missing_split_file(tmp_path, capsys):
    root = make_plain(tmp_path / "ds", ["a"], ann="Annotations", img="JPEGImages")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\n")
    (tmp_path / "data.yaml").write_text("format: voc\nroot: ds\nsplit: test\n")
    assert main(["data", "check", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err
    path = root / "ImageSets" / "Main" / "test.txt"
    assert err == f"detkit: error: split file not found: {path} (available: trainval)\n"


def _evaluate_fixture(tmp_path):
    """Two images, GT cat A + dog in img1, cat B in img2, 64x48 each."""
    root = tmp_path / "ds"
    write_xml(root / "annotations" / "img1.xml", [("cat", (11, 11, 30, 30), 0), ("dog", (31, 5, 60, 40), 0)])
    write_xml(root / "annotations" / "img2.xml", [("cat", (5, 5, 20, 20), 0)])
    write_image(root / "images" / "img1.jpg")
    write_image(root / "images" / "img2.jpg")
    (tmp_path / "data.yaml").write_text("format: voc\nroot: ds\n")
    dets = [
        # [xmin, ymin, w, h] in the XML's pixels: w = xmax - xmin, so this is exactly cat A.
        {"image_id": "img1", "category": "cat", "bbox": [11, 11, 19, 19], "score": 0.9},
        {"image_id": "img1", "category": "dog", "bbox": [31, 5, 29, 35], "score": 0.8},  # exact
        {"image_id": "img2", "category": "dog", "bbox": [1, 1, 5, 5], "score": 0.3},  # no dog there
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))


@pytest.mark.parametrize("metric,cat_ap", [("voc", 0.5), ("voc07", 6 / 11)])
def test_cli_evaluate_gives_the_hand_computed_ap(tmp_path, capsys, metric, cat_ap):
    # cat: 2 GT, one exact detection -> recall 1/2 at precision 1: area AP 0.5; 11-point AP
    # counts the 6 thresholds 0, 0.1, ..., 0.5 -> 6/11.
    # dog: 1 GT, the exact detection ranks above the false positive -> AP 1 either way.
    _evaluate_fixture(tmp_path)
    out = tmp_path / "out" / "result.json"
    rc = main(
        [
            "evaluate",
            "--dataset",
            str(tmp_path / "data.yaml"),
            "--detections",
            str(tmp_path / "dets.json"),
            "--metric",
            metric,
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["metric"] == metric
    assert result["per_class"] == pytest.approx({"cat": cat_ap, "dog": 1.0}, abs=1e-12)
    assert result["mAP"] == pytest.approx((cat_ap + 1.0) / 2, abs=1e-12)
    stdout = capsys.readouterr().out
    assert f"{'mAP':<5}  {3:>7}  {(cat_ap + 1.0) / 2:>7.4f}" in stdout.splitlines()


def test_cli_evaluate_iou_decides_true_and_false_positives(tmp_path):
    # In VOC's inclusive pixels (+1 widths): cat A is 20x20; a detection one pixel up-left
    # (written 0-based by mistake) overlaps 19*19 / (2*400 - 361) = 0.82 > 0.5: still a
    # true positive. Cat B is 16x16; a detection shifted by 8 pixels both ways overlaps
    # 8*8 / (2*256 - 64) = 0.14: a false positive.
    _evaluate_fixture(tmp_path)
    dets = json.loads((tmp_path / "dets.json").read_text())
    dets[0]["bbox"] = [10, 10, 19, 19]
    dets.append({"image_id": "img2", "category": "cat", "bbox": [13, 13, 15, 15], "score": 0.95})
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                str(tmp_path / "data.yaml"),
                "--detections",
                str(tmp_path / "dets.json"),
                "--metric",
                "voc",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    # cat ranked: FP (0.95), TP (0.9): recall 1/2 at precision 1/2 -> AP 0.25.
    assert json.loads(out.read_text())["per_class"]["cat"] == pytest.approx(0.25, abs=1e-12)


def test_case_variants_groups_names_equal_but_for_case():
    assert case_variants(["Dog", "bird", "cat", "dog", "DOG"]) == [["Dog", "dog", "DOG"]]
    assert case_variants(["RBC", "WBC", "Platelets"]) == []


def test_inferred_classes_differing_only_in_case_are_warned_about(tmp_path, caplog):
    ann, img = tmp_path / "annotations", tmp_path / "images"
    for stem, name in (("a", "Dog"), ("b", "dog")):
        write_xml(ann / f"{stem}.xml", [(name, (2, 2, 20, 20), 0)])
        write_image(img / f"{stem}.jpg")
    with caplog.at_level(logging.WARNING, logger="detkit"):
        ds = load_voc(tmp_path)
    assert ds.class_names == ["Dog", "dog"]
    assert warnings_of(caplog) == [
        f"{tmp_path.name}:all: class names that differ only in letter case: Dog, dog "
        "(kept as separate classes; if they are one, fix the annotations)"
    ]

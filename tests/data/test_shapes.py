"""Tests of the generated shapes dataset (detkit.data.shapes)."""

import dataclasses
import hashlib
import itertools
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli import main
from detkit.config import load_config
from detkit.data import shapes as shapes_mod
from detkit.data.build import build_dataset
from detkit.data.shapes import CLASS_NAMES, generate_shapes, read_manifest, render_shapes_image
from detkit.data.shapes_render import box_iou
from detkit.errors import ConfigError
from detkit.schema import Config, DatasetConfig, ShapesConfig


def _files(root: Path):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _parse_xml(path: Path):
    root = ET.parse(path).getroot()
    assert root.tag == "annotation"
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")), int(root.findtext("size/depth")))
    objects = []
    for obj in root.findall("object"):
        box = tuple(int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((obj.findtext("name"), box, obj.findtext("difficult"), obj.findtext("truncated")))
    return root.findtext("filename"), size, objects


def _lines(path: Path):
    return path.read_text().split()


def test_same_arguments_give_byte_identical_files(tmp_path):
    a = generate_shapes(tmp_path / "a", num_train=6, num_test=3, seed=7, coco_json=True)
    b = generate_shapes(tmp_path / "b", num_train=6, num_test=3, seed=7, coco_json=True)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 2 * 9 + 3 + 2 + 1  # xml+png per image, 3 lists, 2 COCO, manifest
    assert files_a == files_b
    c = generate_shapes(tmp_path / "c", num_train=6, num_test=3, seed=8, coco_json=True)
    assert _files(c)["JPEGImages/train_00000.png"] != files_a["JPEGImages/train_00000.png"]


def test_more_images_leave_the_first_ones_unchanged(tmp_path):
    five = _files(generate_shapes(tmp_path / "five", num_train=5, num_test=2))
    eight = _files(generate_shapes(tmp_path / "eight", num_train=8, num_test=3))
    for i in range(5):
        for rel in (f"Annotations/train_{i:05d}.xml", f"JPEGImages/train_{i:05d}.png"):
            assert five[rel] == eight[rel], rel
    for i in range(2):
        assert five[f"JPEGImages/test_{i:05d}.png"] == eight[f"JPEGImages/test_{i:05d}.png"]
    assert eight["ImageSets/Main/train.txt"].startswith(five["ImageSets/Main/train.txt"])


def test_xml_boxes_are_the_tight_boxes_of_the_drawn_pixels(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=12, num_test=0, seed=3)
    n_objects = n_occluded = 0
    for i in range(12):
        stem = f"train_{i:05d}"
        file_name, (w, h, depth), objects = _parse_xml(out / "Annotations" / f"{stem}.xml")
        image = _read_rgb(out / "JPEGImages" / f"{stem}.png")
        assert file_name == f"{stem}.png"
        assert image.shape == (h, w, 3) and depth == 3
        assert 128 <= w <= 192 and 128 <= h <= 192
        # The in-memory rendering gives the background without the shapes and each colour.
        rendered = render_shapes_image("train", i, seed=3)
        assert np.array_equal(rendered.image, image)  # PNG is lossless
        differs = (image != rendered.background).any(axis=2)
        assert 1 <= len(objects) <= 6
        assert len(objects) == len(rendered.objects)
        covered = np.zeros_like(differs)
        for (name, (xmin, ymin, xmax, ymax), difficult, truncated), obj in zip(objects, rendered.objects):
            assert name == obj.name and name in CLASS_NAMES
            assert difficult == "0" and truncated == "0"
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
            # Pixels of this object's colour that are not background: their tight box, in
            # VOC's 1-based inclusive pixels, must be the XML box exactly.
            mine = (image == np.array(obj.colour, np.uint8)).all(axis=2) & differs
            rows, cols = np.nonzero(mine)
            assert (cols.min() + 1, rows.min() + 1, cols.max() + 1, rows.max() + 1) == (xmin, ymin, xmax, ymax)
            covered[ymin - 1 : ymax, xmin - 1 : xmax] = True
            n_objects += 1
            n_occluded += obj.visible_area < obj.full_area
        # Nothing was drawn outside the annotated boxes (no unannotated shape).
        assert not (differs & ~covered).any()
    assert n_objects >= 24
    assert n_occluded >= 1  # the occluded case was exercised


@pytest.mark.parametrize(
    "name, width, height, area, perimeter",
    [
        # size 21: a circle of radius 10 spans 2 * 10 + 1 = 21 px.
        ("circle", (21, 21), (21, 21), math.pi * 10.0**2, 2 * math.pi * 10.0),
        # axis-aligned square with corners at +-10.5 px: 21 or 22 pixel centres per side.
        ("square", (21, 22), (21, 22), 21.0**2, 4 * 21.0),
        # upright equilateral triangle of side 21: height 21 * sqrt(3) / 2 = 18.2 px.
        ("triangle", (21, 22), (18, 20), 21.0**2 * math.sqrt(3) / 4, 3 * 21.0),
    ],
)
def test_single_shape_has_its_hand_computed_size(name, width, height, area, perimeter):
    seen = 0
    for i in range(40):
        img = render_shapes_image("train", i, object_size=21, objects_per_image=1, max_rotation=0.0)
        (obj,) = img.objects
        if obj.name != name:
            continue
        c0, r0, c1, r1 = obj.box
        assert width[0] <= c1 - c0 + 1 <= width[1]
        assert height[0] <= r1 - r0 + 1 <= height[1]
        assert obj.visible_area == obj.full_area == int((img.label_map == 0).sum())
        # Without anti-aliasing cv2 fills the shape plus at most its outline pixels: the
        # count lies between the area and the area of the shape grown by one pixel.
        assert area <= obj.full_area <= area + perimeter + math.pi, (obj.full_area, area)
        seen += 1
    assert seen >= 5


def test_fifty_images_are_balanced_recognisable_and_varied():
    counts = {n: 0 for n in CLASS_NAMES}
    per_image, sizes, colours = [], [], {n: set() for n in CLASS_NAMES}
    for i in range(50):
        img = render_shapes_image("train", i)
        per_image.append(len(img.objects))
        sizes.append((img.width, img.height))
        for j, obj in enumerate(img.objects):
            counts[obj.name] += 1
            colours[obj.name].add(obj.colour)
            # Later shapes cover at most a quarter of an earlier one.
            assert obj.visible_area >= 0.75 * obj.full_area
            visible = img.label_map == j
            assert int(visible.sum()) == obj.visible_area
            contrast = np.linalg.norm(np.array(obj.colour, float) - img.background[visible].mean(axis=0))
            assert contrast >= 80.0
    total = sum(counts.values())
    assert total >= 120
    for name, n in counts.items():
        assert 0.2 * total <= n <= 0.47 * total, counts
        assert len(colours[name]) >= 0.9 * n  # colours vary within a class
    assert min(per_image) >= 1 and max(per_image) == 6
    assert len(set(sizes)) >= 40  # width and height vary


def test_splits_are_disjoint_and_sized_as_asked(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=7, num_test=4)
    main = out / "ImageSets" / "Main"
    train, test = _lines(main / "train.txt"), _lines(main / "test.txt")
    assert len(train) == 7 and len(test) == 4
    assert len(set(train)) == 7 and len(set(test)) == 4
    assert not set(train) & set(test)
    assert _lines(main / "trainval.txt") == train
    assert sorted(p.stem for p in (out / "Annotations").glob("*.xml")) == sorted(train + test)
    images = sorted((out / "JPEGImages").glob("*.png"))
    assert [p.stem for p in images] == sorted(train + test)
    # The split is part of each image's seed: no test image repeats a training image.
    assert len({p.read_bytes() for p in images}) == 11
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["circle", "square", "triangle"]
    assert manifest["version"] == shapes_mod.SHAPES_VERSION and manifest["complete"] is True
    assert manifest["params"]["num_train"] == 7 and manifest["params"]["num_test"] == 4


def test_coco_json_agrees_with_the_xml(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=5, num_test=3, coco_json=True)
    for split, n in (("train", 5), ("test", 3)):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "circle"), (2, "square"), (3, "triangle")]
        assert [im["id"] for im in coco["images"]] == list(range(1, n + 1))
        ids = _lines(out / "ImageSets" / "Main" / f"{split}.txt")
        n_xml = 0
        for im, stem in zip(coco["images"], ids):
            file_name, (w, h, _), objects = _parse_xml(out / "Annotations" / f"{stem}.xml")
            assert (im["file_name"], im["width"], im["height"]) == (file_name, w, h)
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
            assert len(anns) == len(objects)
            for a, (name, (xmin, ymin, xmax, ymax), _, _) in zip(anns, objects):
                assert CLASS_NAMES[a["category_id"] - 1] == name
                assert a["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
                assert a["area"] == (xmax - xmin + 1) * (ymax - ymin + 1)
                assert a["iscrowd"] == 0
            n_xml += len(objects)
        assert len(coco["annotations"]) == n_xml
        assert len({a["id"] for a in coco["annotations"]}) == n_xml


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as info:
        generate_shapes(target, num_train=2, num_test=1)
    message = str(info.value)
    assert str(target) in message and "\n" not in message
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    # overwrite=True writes the dataset beside the user's file and leaves that file alone.
    generate_shapes(target, num_train=2, num_test=1, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert len(list((target / "Annotations").glob("*.xml"))) == 3
    # A file in the way of the folder itself is refused too.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path / "afile", num_train=1, num_test=0)


def test_other_parameters_are_refused_then_regenerated_with_overwrite(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=4, num_test=2, seed=0)
    (out / "JPEGImages" / "user_image.png").write_bytes(b"not ours")
    before = _files(out)
    with pytest.raises(FileExistsError, match="seed"):
        generate_shapes(out, num_train=4, num_test=2, seed=1)
    assert _files(out) == before  # nothing written
    generate_shapes(out, num_train=2, num_test=1, seed=1, overwrite=True)
    # Files of the old generation it no longer lists are gone; the user's file stays.
    assert sorted(p.stem for p in (out / "Annotations").glob("*.xml")) == ["test_00000", "train_00000", "train_00001"]
    assert (out / "JPEGImages" / "user_image.png").read_bytes() == b"not ours"
    assert not (out / "JPEGImages" / "train_00003.png").exists()
    fresh = _files(generate_shapes(tmp_path / "fresh", num_train=2, num_test=1, seed=1))
    after = _files(out)
    del after["JPEGImages/user_image.png"]
    assert after == fresh


def test_matching_folder_is_reused_without_rewriting(tmp_path, monkeypatch):
    out = generate_shapes(tmp_path / "s", num_train=3, num_test=1)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("rendered again although the folder matches")

    monkeypatch.setattr(shapes_mod, "render_image", fail)
    assert generate_shapes(tmp_path / "s", num_train=3, num_test=1) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    monkeypatch.undo()
    # A missing file (or an interrupted run) makes it regenerate: same bytes as before.
    before = _files(out)
    (out / "JPEGImages" / "train_00001.png").unlink()
    generate_shapes(out, num_train=3, num_test=1)
    assert _files(out) == before


def test_bad_parameters_raise_one_line_errors(tmp_path):
    cases = [
        (dict(object_size=(16, 120)), "object_size"),
        (dict(image_format="gif"), "image_format"),
        (dict(seed=-1), "seed"),
        (dict(image_size=(192, 128)), "image_size"),
        (dict(objects_per_image=(1, 2.5)), "objects_per_image"),
        (dict(max_iou=1.5), "max_iou"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ValueError, match=key) as info:
            generate_shapes(tmp_path / "bad", **{"num_train": 1, "num_test": 0, **kwargs})
        assert "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_jpg_format_writes_jpgs_named_in_the_xml(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=2, num_test=1, image_format="jpg")
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == [
        "test_00000.jpg",
        "train_00000.jpg",
        "train_00001.jpg",
    ]
    file_name, (w, h, _), _ = _parse_xml(out / "Annotations" / "train_00001.xml")
    assert file_name == "train_00001.jpg"
    assert (out / "JPEGImages" / file_name).read_bytes()[:2] == b"\xff\xd8"  # JPEG magic
    assert _read_rgb(out / "JPEGImages" / file_name).shape == (h, w, 3)


# -- one set of options for Python, configs and the command line ----------------------------
def test_generate_shapes_uses_the_schema_defaults(tmp_path):
    out = generate_shapes(tmp_path / "s", num_train=2, num_test=1)
    assert read_manifest(out)["params"] == {
        **dataclasses.asdict(ShapesConfig()),
        "num_train": 2,
        "num_test": 1,
    }
    # Passing the dataclass and passing the same values as keywords give the same files.
    options = ShapesConfig(num_train=2, num_test=1)
    assert _files(generate_shapes(tmp_path / "t", options)) == _files(out)


def test_options_are_checked_with_one_line_errors():
    cases = [
        (dict(classes=["circle", "hexagon"]), "classes"),
        (dict(classes=[]), "classes"),
        (dict(classes=["circle", "circle"]), "classes"),
        (dict(max_outside=1.0), "max_outside"),
        (dict(cluster=1.5), "cluster"),
        (dict(aspect_ratio=[3.0, 4.0], image_size=[96, 128]), "aspect_ratio"),
        (dict(object_size=[16, 200], max_outside=0.5), "object_size"),
        (dict(num_train=True), "num_train"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ValueError, match=key) as info:
            ShapesConfig(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="unknown option 'colour'"):
        render_shapes_image("train", 0, colour="red")


def test_config_errors_name_the_key(tmp_path):
    yaml = tmp_path / "data.yaml"
    yaml.write_text(f"data:\n  train:\n    format: shapes\n    root: {tmp_path / 's'}\n    shapes: {{max_iou: 2}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(yaml, Config)
    assert str(info.value).startswith("data.train.shapes: max_iou must be in [0, 1], got 2.0")


def test_command_line_flags_are_the_schema_fields(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["data", "shapes", "--out", str(out), "--num-train", "3", "--num-test", "1", "--classes", "square"]
    args += ["--image-size", "64", "96", "--object-size", "20", "50", "--max-outside", "0.25", "--coco-json"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"shapes dataset ready: {out} (3 train, 1 test images)"
    expected = ShapesConfig(
        num_train=3, num_test=1, classes=["square"], image_size=[64, 96], object_size=[20, 50], max_outside=0.25
    )
    assert read_manifest(out)["params"] == dataclasses.asdict(expected)
    assert read_manifest(out)["class_names"] == ["square"]
    # Every field has its flag (so a new option cannot be forgotten on the command line).
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(ShapesConfig):
        assert "--" + f.name.replace("_", "-") in help_text
    assert main(["data", "shapes", "--out", str(tmp_path / "bad"), "--max-iou", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "detkit: error: --max-iou: max_iou must be in [0, 1], got 3.0"
    )


def test_folder_of_a_manifest_without_the_newer_options_is_reused(tmp_path, monkeypatch):
    # Manifests written before aspect_ratio, classes, cluster and max_outside existed.
    out = generate_shapes(tmp_path / "s", num_train=2, num_test=1)
    manifest = json.loads((out / "shapes.json").read_text())
    for key in ("aspect_ratio", "classes", "cluster", "max_outside"):
        del manifest["params"][key]
    (out / "shapes.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(shapes_mod, "render_image", lambda *a, **k: pytest.fail("rendered again"))
    assert generate_shapes(out, num_train=2, num_test=1) == out
    with pytest.raises(FileExistsError, match=r"other parameters \(classes\)"):
        generate_shapes(out, num_train=2, num_test=1, classes=["circle"])


# sha256 (first 16 hex digits) of what the code before the renderer / writer split (commit
# afc8a76) wrote with the default options, seed 0: the decoded pixels (RGB, row-major; PNG
# bytes would also pin the zlib version) and the XML file's bytes.
PRE_SPLIT_SHA256 = {
    "JPEGImages/train_00000.png": "753a7e8d8f23a50c",  # 183 x 169 px
    "JPEGImages/test_00000.png": "07ac9a41bb46f515",  # 161 x 185 px
    "Annotations/train_00001.xml": "310b6988557eb854",
}


def test_default_images_are_the_same_as_before_the_split(tmp_path):
    """The split and the new options leave the default images (the quick start's) unchanged."""
    out = generate_shapes(tmp_path / "s", num_train=2, num_test=1, seed=0)
    for rel, digest in PRE_SPLIT_SHA256.items():
        data = (out / rel).read_bytes()
        if rel.endswith(".png"):
            data = cv2.cvtColor(_read_rgb(out / rel), cv2.COLOR_RGB2BGR).tobytes()
        assert hashlib.sha256(data).hexdigest()[:16] == digest, rel


# -- regimes: each config under configs/_base_/datasets/shapes_*.yaml does what it says -----
REGIME_DIR = Path(__file__).resolve().parents[2] / "configs" / "_base_" / "datasets"


def _regime(name: str) -> ShapesConfig:
    cfg = load_config(REGIME_DIR / f"shapes_{name}.yaml", Config)
    assert cfg.data.train.shapes == cfg.data.test.shapes
    assert Path(cfg.data.train.root).name == f"shapes_{name}"  # a folder of its own
    return cfg.data.train.shapes


def _rendered(options: ShapesConfig, n: int):
    return [render_shapes_image("train", i, options) for i in range(n)]


def _touches_border(obj, img) -> bool:
    c0, r0, c1, r1 = obj.box
    return c0 == 0 or r0 == 0 or c1 == img.width - 1 or r1 == img.height - 1


def _pair_ious(img, attr="box"):
    return [box_iou(getattr(a, attr), getattr(b, attr)) for a, b in itertools.combinations(img.objects, 2)]


def test_regime_large_objects_cross_the_border_and_are_truncated(tmp_path):
    options = _regime("large")
    assert options.num_train + options.num_test >= 200
    images = _rendered(options, 30)
    objects = [(obj, img) for img in images for obj in img.objects]
    assert len(objects) >= 45
    lo, hi = options.object_size
    for obj, img in objects:
        assert lo <= obj.size <= hi and obj.size <= 0.8 * min(img.width, img.height)
        # The box is the visible part, inside the image (clipped).
        mine = img.label_map == img.objects.index(obj)
        rows, cols = np.nonzero(mine)
        assert obj.box == (cols.min(), rows.min(), cols.max(), rows.max())
        assert obj.truncated == (obj.outside_area > 0)
        if obj.truncated:
            assert _touches_border(obj, img)
            assert obj.outside_area <= options.max_outside * (obj.full_area + obj.outside_area)
        # Inside + outside pixels make the whole shape: its area, up to the outline pixels
        # that cv2 adds without anti-aliasing (as in the single-shape test above).
        area = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}[obj.name] * obj.size**2
        perimeter = {"circle": math.pi, "square": 4.0, "triangle": 3.0}[obj.name] * obj.size
        assert area - perimeter <= obj.full_area + obj.outside_area <= area + perimeter + math.pi
    touching = np.mean([_touches_border(obj, img) for obj, img in objects])
    truncated = np.mean([obj.truncated for obj, _ in objects])
    assert touching >= 0.4 and truncated >= 0.4, (touching, truncated)
    assert max(obj.size / min(img.width, img.height) for obj, img in objects) >= 0.6  # large indeed
    # VOC truncated=1 in the files for exactly these objects.
    out = generate_shapes(tmp_path / "large", dataclasses.replace(options, num_train=4, num_test=0))
    for i in range(4):
        _, _, xml_objects = _parse_xml(out / "Annotations" / f"train_{i:05d}.xml")
        assert [t for *_, t in xml_objects] == [str(int(o.truncated)) for o in images[i].objects]


def test_default_shapes_never_cross_the_border():
    for img in _rendered(ShapesConfig(), 20):
        assert all(not obj.truncated for obj in img.objects)


def test_regime_one_class(tmp_path):
    options = _regime("one_class")
    assert options.classes == ["circle"]
    objects = [obj for img in _rendered(options, 20) for obj in img.objects]
    assert len(objects) >= 30 and {(o.name, o.label) for o in objects} == {("circle", 1)}
    small = dataclasses.replace(options, num_train=3, num_test=2)
    cfg = DatasetConfig(format="shapes", root=str(tmp_path / "one"), split="test", shapes=small)
    dataset = build_dataset(cfg)
    assert dataset.class_names == ["circle"]
    assert {int(k) for r in dataset.records for k in r.labels} == {1}
    out = generate_shapes(tmp_path / "coco", small, coco_json=True)
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle"]


def test_regime_few_images_of_varied_sizes_and_aspect_ratios():
    options = _regime("few_varied")
    assert options.num_train + options.num_test <= 200
    images = _rendered(options, 60)
    widths = np.array([img.width for img in images])
    heights = np.array([img.height for img in images])
    ratios = heights / widths
    assert widths.min() >= 96 and heights.min() >= 96 and widths.max() <= 320 and heights.max() <= 320
    assert 0.5 <= ratios.min() and ratios.max() <= 2.0
    # Spread over the range: small and large sides, portrait and landscape.
    assert min(widths.min(), heights.min()) < 130 and max(widths.max(), heights.max()) > 280
    assert (ratios < 0.75).sum() >= 5 and (ratios > 1.33).sum() >= 5
    assert len(set(zip(widths, heights))) >= 55
    lo, hi = options.object_size
    assert all(lo <= obj.size <= hi for img in images for obj in img.objects)


def test_regime_many_small_objects():
    options = _regime("small_many")
    images = _rendered(options, 20)
    counts = np.array([len(img.objects) for img in images])
    assert counts.min() >= 15 and counts.max() <= 40 and counts.mean() >= 22
    lo, hi = options.object_size
    assert (lo, hi) == (8.0, 24.0)
    for img in images:
        assert all(lo <= obj.size <= hi for obj in img.objects)
        assert max(_pair_ious(img, "full_box")) <= options.max_iou


def test_regime_overlapping_objects():
    options = _regime("overlap")
    images = _rendered(options, 40)
    ious = [iou for img in images for iou in _pair_ious(img, "full_box")]
    over_default = [img for img in images if max(_pair_ious(img), default=0.0) > ShapesConfig().max_iou]
    assert len(over_default) >= 8  # overlaps the default options forbid occur often
    assert max(ious) <= options.max_iou
    visible = [obj.visible_area / obj.full_area for img in images for obj in img.objects]
    assert min(visible) >= options.min_visible and sum(v < 0.75 for v in visible) >= 5
    # With the default options no two placed shapes overlap by more than max_iou 0.3.
    for img in _rendered(ShapesConfig(), 40):
        assert max(_pair_ious(img, "full_box"), default=0.0) <= 0.3


@pytest.mark.parametrize("name", ["large", "one_class", "few_varied", "small_many", "overlap"])
def test_regime_files_are_deterministic(tmp_path, name):
    options = dataclasses.replace(_regime(name), num_train=3, num_test=1)
    a = _files(generate_shapes(tmp_path / "a", options))
    b = _files(generate_shapes(tmp_path / "b", options))
    assert a == b and len(a) == 2 * 4 + 3 + 1

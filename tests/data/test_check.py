"""Tests of dataset validation (detkit.data.check) and ``detkit data check``."""

import contextlib
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli import main
from detkit.data.check import check_dataset, format_report
from detkit.data.voc import load_voc


def shared_dir() -> Path:
    env = os.environ.get("DETKIT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared"


BCCD = shared_dir() / "data" / "BCCD"


def write_xml(path: Path, objects, size=(64, 48)) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{path.stem}.jpg</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height></size>{objs}</annotation>"
    )


def write_image(path: Path, width=64, height=48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 200, np.uint8))


@pytest.fixture
def small_voc(tmp_path):
    """a: cat 20x20 + difficult dog 10x40 (+ one zero-area box); b: cat 40x10; c: empty."""
    root = tmp_path / "ds"
    write_xml(
        root / "annotations" / "a.xml",
        [("cat", (11, 11, 30, 30), 0), ("dog", (1, 1, 10, 40), 1), ("cat", (5, 5, 5, 9), 0)],
    )
    write_xml(root / "annotations" / "b.xml", [("cat", (1, 1, 40, 10), 0)])
    write_xml(root / "annotations" / "c.xml", [])
    for stem in "abc":
        write_image(root / "images" / f"{stem}.jpg")
    (tmp_path / "data.yaml").write_text("format: voc\nroot: ds\n")
    return root


def test_report_of_a_small_dataset(small_voc):
    report = check_dataset(load_voc(small_voc), progress=False)
    assert report["name"] == "ds:all"
    assert (report["images"], report["objects"], report["images_without_objects"]) == (3, 3, 1)
    assert report["per_class"] == {"cat": {"objects": 2, "difficult": 0}, "dog": {"objects": 1, "difficult": 1}}
    # Widths and heights are both {20, 10, 40} -> sorted [10, 20, 40]; numpy's linear
    # percentiles: p5 at position 0.1 -> 11, p95 at position 1.9 -> 38. Every area is 400.
    spread = {"min": 10.0, "p5": 11.0, "median": 20.0, "p95": 38.0, "max": 40.0}
    assert report["box_sizes"]["width"] == pytest.approx(spread)
    assert report["box_sizes"]["height"] == pytest.approx(spread)
    assert report["box_sizes"]["sqrt_area"] == pytest.approx({k: 20.0 for k in spread})
    assert report["image_sizes"] == [[64, 48]] and report["num_image_sizes"] == 1
    assert report["warnings"] == ["ds:all: dropped zero-area boxes: 1 in 1 file (a.xml)"]
    assert report["errors"] == []


def test_format_report(small_voc):
    text = format_report(check_dataset(load_voc(small_voc), progress=False))
    assert text.splitlines() == [
        "dataset ds:all: 3 images, 3 objects, 1 images without objects",
        "  class  objects  difficult",
        "  cat          2          0",
        "  dog          1          1",
        "  box width     min 10.0  p5 11.0  median 20.0  p95 38.0  max 40.0 px",
        "  box height    min 10.0  p5 11.0  median 20.0  p95 38.0  max 40.0 px",
        "  box sqrt_area min 20.0  p5 20.0  median 20.0  p95 20.0  max 20.0 px",
        "  image sizes: 64x48",
        "problems fixed or skipped (1):",
        "  - ds:all: dropped zero-area boxes: 1 in 1 file (a.xml)",
    ]


def write_undecodable_jpeg(path: Path) -> None:
    """A JPEG whose header parses and whose end marker is in place, with a Huffman table
    that cannot be (its 16 code counts add up to more than 256): only decoding finds it."""
    ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), 200, np.uint8))
    data = bytearray(buf.tobytes())
    dht = data.index(b"\xff\xc4")  # marker, 2-byte length, table class/id, 16 counts
    data[dht + 5 : dht + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))


def write_truncated_jpeg(path: Path, cut: int = 20) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path.write_bytes(cv2.imencode(".jpg", noise)[1].tobytes()[:-cut])


def test_corrupt_image_and_size_mismatch_are_reported(small_voc):
    write_undecodable_jpeg(small_voc / "images" / "b.jpg")
    write_image(small_voc / "images" / "c.jpg", 40, 30)
    dataset = load_voc(small_voc)
    report = check_dataset(dataset, progress=False)
    assert report["errors"] == [f"cannot decode image: {small_voc / 'images' / 'b.jpg'} (not an image or corrupt)"]
    assert report["warnings"][1:] == [f"{small_voc / 'images' / 'c.jpg'}: annotation says 64x48, image is 40x30"]
    # Without decoding, only what the loader saw.
    report = check_dataset(dataset, decode_images=False, progress=False)
    assert report["errors"] == [] and len(report["warnings"]) == 1


def test_partial_decodes_are_warnings_reported_once(small_voc):
    write_truncated_jpeg(small_voc / "images" / "b.jpg")
    dataset = load_voc(small_voc)
    line = "ds:all: decoded partially (truncated image data): 1 in 1 file (b.jpg)"
    assert dataset.problems.lines() == ["ds:all: dropped zero-area boxes: 1 in 1 file (a.xml)", line]
    report = check_dataset(dataset, progress=False)
    # The full decode agrees with the loader's check and does not repeat its line.
    assert report["errors"] == [] and report["warnings"][1:] == [line]
    # A partial decode that the loader's check did not see (here: a dataset built in
    # memory, without a problem log) is found by the full decode, as a warning.
    dataset.problems = None
    report = check_dataset(dataset, progress=False)
    assert report["errors"] == [] and report["warnings"] == [line]


def test_clean_dataset_says_no_problems(tmp_path):
    write_xml(tmp_path / "ds" / "annotations" / "a.xml", [("cat", (11, 11, 30, 30), 0)])
    write_image(tmp_path / "ds" / "images" / "a.jpg")
    text = format_report(check_dataset(load_voc(tmp_path / "ds"), progress=False))
    assert text.splitlines()[-1] == "no problems found"


def test_cli_returns_1_and_names_the_corrupt_image(small_voc, capsys):
    bad = small_voc / "images" / "b.jpg"
    write_undecodable_jpeg(bad)
    rc = main(["data", "check", str(small_voc.parent / "data.yaml")])
    assert rc == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["errors (1):", f"  - cannot decode image: {bad} (not an image or corrupt)"]


def test_cli_reports_skipped_and_partial_images_as_problems_not_errors(small_voc, capsys):
    (small_voc / "images" / "b.jpg").write_bytes(b"garbage")
    write_truncated_jpeg(small_voc / "images" / "c.jpg")
    rc = main(["data", "check", str(small_voc.parent / "data.yaml")])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset ds:all: 2 images, 2 objects, 1 images without objects"
    assert out[-4:] == [
        "problems fixed or skipped (3):",
        "  - ds:all: dropped zero-area boxes: 1 in 1 file (a.xml)",
        "  - ds:all: skipped unreadable images: 1 in 1 file (b.jpg)",
        "  - ds:all: decoded partially (truncated image data): 1 in 1 file (c.jpg)",
    ]


def test_cli_no_decode_still_skips_unreadable_images(small_voc, capsys):
    (small_voc / "images" / "b.jpg").write_bytes(b"garbage")
    assert main(["data", "check", "--no-decode", str(small_voc.parent / "data.yaml")]) == 0
    out = capsys.readouterr().out
    assert "errors" not in out and "ds:all: skipped unreadable images: 1 in 1 file (b.jpg)" in out


# -- the real BCCD folder, decoded once for the whole module ---------------------------------
@pytest.fixture(scope="module")
def bccd_check(tmp_path_factory):
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD not found under {BCCD} (set DETKIT_SHARED)")
    yaml = tmp_path_factory.mktemp("bccd") / "bccd.yaml"
    yaml.write_text(f"format: voc\nroot: {BCCD.resolve()}\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["data", "check", str(yaml)])
    return rc, out.getvalue().splitlines(), err.getvalue().splitlines()


def test_cli_check_bccd_returns_0(bccd_check):
    rc, out, _ = bccd_check
    assert rc == 0
    assert not any(line.startswith("errors") for line in out)


def test_cli_check_bccd_prints_the_class_table(bccd_check):
    _, out, _ = bccd_check
    assert out[0] == "dataset BCCD:all: 364 images, 4886 objects, 0 images without objects"
    assert out[1:5] == [
        "  class      objects  difficult",
        "  Platelets      361          0",
        "  RBC           4153          0",
        "  WBC            372          0",
    ]
    assert "  image sizes: 640x480" in out


def test_cli_check_bccd_reports_the_two_zero_size_boxes(bccd_check):
    _, out, err = bccd_check
    line = "BCCD:all: dropped zero-area boxes: 2 in 2 files (BloodImage_00338.xml, BloodImage_00343.xml)"
    assert out[-2:] == ["problems fixed or skipped (1):", f"  - {line}"]
    # The loader's warning, once, on stderr (besides info lines and the progress bar).
    assert [e for e in err if e.startswith("warning:")] == [f"warning: {line}"]


def test_cli_checks_both_splits_of_a_run_config_with_train_classes(small_voc, tmp_path, capsys):
    # A separate test folder holding only dogs: inferred on its own its class list would be
    # [dog]; checked as training labels it, it has train's [cat, dog] (cat: 0 objects).
    write_xml(tmp_path / "ds2" / "annotations" / "d.xml", [("dog", (3, 3, 20, 20), 0)])
    write_image(tmp_path / "ds2" / "images" / "d.jpg")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  train: {format: voc, root: ds}\n  test: {format: voc, root: ds2}\n")
    plots = tmp_path / "plots"
    assert main(["data", "check", "--no-decode", str(cfg), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line for line in out if line.startswith("dataset ")]
    assert heads == [
        "dataset ds:all: 3 images, 3 objects, 1 images without objects",
        "dataset ds2:all: 1 images, 1 objects, 0 images without objects",
    ]
    test_table = out[out.index(heads[1]) + 1 : out.index(heads[1]) + 4]
    expected = [["class", "objects", "difficult"], ["cat", "0", "0"], ["dog", "1", "0"]]
    assert [line.split() for line in test_table] == expected
    names = {split: sorted(p.name for p in (plots / split).glob("*.png")) for split in ("train", "test")}
    assert names["train"] == names["test"] and len(names["test"]) == 4
    # --split picks one.
    assert main(["data", "check", "--no-decode", str(cfg), "--split", "test"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dataset ")]
    assert heads == ["dataset ds2:all: 1 images, 1 objects, 0 images without objects"]


def test_cli_check_of_a_run_config_with_errors_in_train_only_returns_1(small_voc, tmp_path, capsys):
    write_undecodable_jpeg(small_voc / "images" / "b.jpg")
    write_xml(tmp_path / "ds2" / "annotations" / "d.xml", [("dog", (3, 3, 20, 20), 0)])
    write_image(tmp_path / "ds2" / "images" / "d.jpg")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  train: {format: voc, root: ds}\n  test: {format: voc, root: ds2}\n")
    assert main(["data", "check", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"cannot decode image: {small_voc / 'images' / 'b.jpg'}" in out
    assert out.rstrip().endswith("no problems found")  # the test split, checked after train
    assert main(["data", "check", str(cfg), "--split", "test"]) == 0

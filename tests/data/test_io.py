"""Tests of image reading, path containment and problem summaries (detkit.data.io)."""

import os

import cv2
import numpy as np
import pytest
import torch

from detkit.data.io import (
    ImageReadError,
    ProblemLog,
    find_image,
    image_size,
    is_within,
    read_image,
    read_image_array,
)


def _write_rgb(path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# -- reading images -------------------------------------------------------------------------
def test_read_image_gives_rgb_float_chw_in_unit_range(tmp_path):
    rgb = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [0, 0, 0], [255, 255, 255]]], np.uint8
    )  # (H=2, W=3, 3)
    _write_rgb(tmp_path / "a.png", rgb)  # PNG: lossless, so the pixels come back exactly
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.float32 and image.shape == (3, 2, 3)
    # Channel 0 is red: the pure-red pixel (0, 0) has 1 there and 0 in green/blue.
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 0, 2].tolist() == [0.0, 0.0, 1.0]
    assert torch.equal(image[:, 1, 0], torch.tensor([10, 20, 30]) / 255.0)
    assert np.array_equal(read_image_array(tmp_path / "a.png"), rgb)


def test_grey_images_get_three_channels_and_alpha_is_dropped(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    assert cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_image_array(tmp_path / "g.png")
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))

    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 255, 7  # blue, nearly transparent
    assert cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    out = read_image_array(tmp_path / "rgba.png")
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 255]


def test_missing_image_raises_naming_the_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(err.value) == f"image not found: {path}"


@pytest.mark.parametrize("content", [b"", b"this is not an image at all", "truncated"])
def test_corrupt_image_raises_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":  # the first half of a real JPEG (an interrupted download)
        rng = np.random.default_rng(0)
        ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        content = buf.tobytes()[: len(buf) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = str(err.value)
    assert message == f"cannot decode image: {path} (not an image or corrupt)"
    assert "\n" not in message


def test_image_size_reads_the_header(tmp_path):
    _write_rgb(tmp_path / "a.jpg", np.zeros((30, 50, 3), np.uint8))
    assert image_size(tmp_path / "a.jpg") == (50, 30)  # (width, height)
    with pytest.raises(ImageReadError, match="image not found: .*b.jpg"):
        image_size(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageReadError) as err:
        image_size(tmp_path / "c.jpg")
    assert str(err.value).startswith(f"cannot read image header: {tmp_path / 'c.jpg'} (")


# -- paths ------------------------------------------------------------------------------------
def test_is_within(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    assert is_within(root / "a.jpg", root)
    assert is_within(root / "sub" / ".." / "a.jpg", root)
    assert not is_within(root / ".." / "a.jpg", root)
    assert not is_within(root / ".." / ".." / "etc" / "passwd", root)
    assert not is_within("/etc/passwd", root)
    assert not is_within(tmp_path / "images_other" / "a.jpg", root)  # a prefix is not a parent


def test_is_within_follows_the_name_not_symlinks(tmp_path):
    # A dataset folder built from links to files elsewhere must stay usable: what is
    # checked is the path the annotation names, not where the user's link points.
    (tmp_path / "store").mkdir()
    _write_rgb(tmp_path / "store" / "x.jpg", np.zeros((4, 4, 3), np.uint8))
    root = tmp_path / "images"
    root.mkdir()
    os.symlink(tmp_path / "store" / "x.jpg", root / "x.jpg")
    assert is_within(root / "x.jpg", root)


def test_find_image_prefers_the_hint_then_tries_extensions(tmp_path):
    for name in ("a.png", "b.JPG", "c.jpg", "photo_c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert find_image(tmp_path, "a") == tmp_path / "a.png"
    assert find_image(tmp_path, "b") == tmp_path / "b.JPG"
    assert find_image(tmp_path, "c", "photo_c.jpg") == tmp_path / "photo_c.jpg"
    assert find_image(tmp_path, "c", "c.png") == tmp_path / "c.jpg"  # stale hint: by stem
    assert find_image(tmp_path, "d") is None


# -- problem summaries ------------------------------------------------------------------------
def test_problem_log_one_line_per_kind():
    log = ProblemLog("voc:train")
    log.add("dropped zero-area boxes", "/data/Annotations/a.xml")
    log.add("dropped zero-area boxes", "/data/Annotations/b.xml", 2)
    log.add("dropped zero-area boxes", "/data/Annotations/a.xml")
    log.add("skipped malformed annotation files", "/data/Annotations/c.xml")
    assert log.count("dropped zero-area boxes") == 4
    assert log.count("something else") == 0
    assert log.lines() == [
        "voc:train: dropped zero-area boxes: 4 in 2 files (a.xml, b.xml)",
        "voc:train: skipped malformed annotation files: 1 in 1 file (c.xml)",
    ]
    assert log.as_dict()["dropped zero-area boxes"] == {
        "count": 4,
        "files": ["/data/Annotations/a.xml", "/data/Annotations/b.xml"],
    }


def test_problem_log_shortens_long_file_lists(caplog):
    log = ProblemLog("ds")
    for i in range(5):
        log.add("skipped annotations whose image is missing", f"{i}.xml")
    assert log.lines(max_files=3) == [
        "ds: skipped annotations whose image is missing: 5 in 5 files (0.xml, 1.xml, 2.xml, +2 more)"
    ]
    import logging

    logger = logging.getLogger("detkit")
    propagate, logger.propagate = logger.propagate, True  # the CLI turns it off
    try:
        with caplog.at_level(logging.WARNING, logger="detkit"):
            log.warn()
    finally:
        logger.propagate = propagate
    assert [r.getMessage() for r in caplog.records] == log.lines()

"""Tests of image reading, path containment and problem summaries (detkit.data.io)."""

import os
import struct

import cv2
import numpy as np
import pytest
import torch

from detkit.data import io as io_mod
from detkit.data.io import (
    ImageProbe,
    ImageReadError,
    ProblemLog,
    decode_image,
    find_image,
    image_size,
    is_within,
    probe_image,
    read_image,
    read_image_array,
    usable_image,
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


def _smooth_image(height=120, width=160) -> np.ndarray:
    """(H, W, 3) uint8 with photo-like smooth content (compresses to a few KB as JPEG)."""
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (7, 7), 3)


def _encode(image_rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image or corrupt"),
        ("header only", "not an image or corrupt"),
    ],
)
def test_undecodable_image_raises_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "header only":  # a real JPEG cut before its image data: nothing to decode
        data = _encode(_smooth_image(), ".jpg")
        content = data[: data.index(b"\xff\xda")]  # up to the start-of-scan marker
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = str(err.value)
    assert message == f"cannot decode image: {path} ({reason})"
    assert "\n" not in message


# -- partly decodable images ------------------------------------------------------------------
def test_truncated_jpeg_decodes_like_imread_with_a_counted_warning(tmp_path):
    intact_rgb = _smooth_image()
    data = _encode(intact_rgb, ".jpg")
    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[:-20])  # an interrupted download
    intact = read_image_array(tmp_path / "whole.jpg")
    log = ProblemLog("ds")
    out = read_image_array(tmp_path / "cut.jpg", problems=log)
    assert out.shape == intact.shape == (120, 160, 3)
    # The reference: cv2.imread, which reads files through libjpeg's own stdio source.
    assert np.array_equal(out, cv2.cvtColor(cv2.imread(str(tmp_path / "cut.jpg")), cv2.COLOR_BGR2RGB))
    # 20 bytes are less than one row of 16x16 MCUs (4:2:0): the rows above the last two MCU
    # rows (chroma upsampling reaches one row up) are intact, and the last ones are not.
    assert np.array_equal(out[:96], intact[:96])
    assert not np.array_equal(out, intact)
    assert log.lines() == ["ds: decoded partially (truncated image data): 1 in 1 file (cut.jpg)"]
    assert decode_image(tmp_path / "whole.jpg")[1] is None
    assert decode_image(tmp_path / "cut.jpg")[1] == "truncated image data"


def test_half_a_jpeg_decodes_its_first_rows_and_grey_below(tmp_path):
    intact = _smooth_image()
    data = _encode(intact, ".jpg")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    out, note = decode_image(tmp_path / "half.jpg")
    assert note == "truncated image data" and out.shape == (120, 160, 3)
    same = (out == read_image_array_from_bytes(data)).all(axis=(1, 2))
    first_bad = int(np.flatnonzero(~same)[0])
    assert 16 <= first_bad <= 104 and same[:first_bad].all()
    # Missing DCT blocks decode to level 128 in every channel.
    assert (out[-8:] == 128).all()


def read_image_array_from_bytes(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_truncated_png_decodes_its_first_rows_with_a_counted_warning(tmp_path):
    intact = _smooth_image()
    data = _encode(intact, ".png")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(tmp_path / "cut.png")) is None  # libpng gives up on it
    log = ProblemLog("ds")
    out = read_image_array(tmp_path / "cut.png", problems=log)
    assert out.shape == (120, 160, 3)
    same = (out == intact).all(axis=(1, 2))
    first_bad = int(np.flatnonzero(~same)[0])
    # PNG compresses row by row: about half of the rows are in the first half of the file.
    assert 40 <= first_bad <= 80 and same[:first_bad].all()
    assert (out[-1] == 0).all()  # PIL leaves the rows it has no data for black
    assert log.lines() == ["ds: decoded partially (truncated image data): 1 in 1 file (cut.png)"]


def test_partial_decode_without_a_log_warns_once_per_file(tmp_path, detkit_log):
    data = _encode(_smooth_image(), ".jpg")
    path = tmp_path / "once.jpg"
    path.write_bytes(data[:-20])
    for _ in range(3):  # three epochs
        read_image(path)
    warnings = [r.getMessage() for r in detkit_log.records if r.levelname == "WARNING"]
    assert warnings == [f"decoded partially (truncated image data): {path} (the missing part is filled in)"]


# -- the cheap check at load time ------------------------------------------------------------
def _with_trailer_and_comment(jpeg: bytes, comment: bytes, trailer: bytes) -> bytes:
    """The JPEG with a COM segment after SOI and ``trailer`` bytes after its EOI marker."""
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:] + trailer


def test_probe_reads_headers_and_decodes_only_suspicious_files(tmp_path, monkeypatch):
    data = _encode(_smooth_image(), ".jpg")
    (tmp_path / "ok.jpg").write_bytes(data)
    # Bytes after the end-of-image marker (some cameras append a trailer): still complete.
    (tmp_path / "trailer.jpg").write_bytes(_with_trailer_and_comment(data, b"hello", b"SEFT" + b"\x00" * 100))
    _write_rgb(tmp_path / "ok.png", _smooth_image(30, 50))
    calls = []
    real_decode = io_mod.decode_image

    def counting_decode(path):
        calls.append(os.path.basename(path))
        return real_decode(path)

    monkeypatch.setattr(io_mod, "decode_image", counting_decode)
    assert probe_image(tmp_path / "ok.jpg") == ImageProbe(160, 120, "JPEG", None)
    assert probe_image(tmp_path / "trailer.jpg") == ImageProbe(160, 120, "JPEG", None)
    assert probe_image(tmp_path / "ok.png") == ImageProbe(50, 30, "PNG", None)
    assert calls == []  # header and end marker only
    # An end-of-image marker inside a header segment (as in an EXIF thumbnail) does not
    # hide a cut: only a marker after the start of the scan counts.
    (tmp_path / "cut.jpg").write_bytes(_with_trailer_and_comment(data, b"thumb\xff\xd9", b"")[:-20])
    assert probe_image(tmp_path / "cut.jpg") == ImageProbe(160, 120, "JPEG", "truncated image data")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:-30])
    assert probe_image(tmp_path / "cut.png").partial == "truncated image data"
    assert calls == ["cut.jpg", "cut.png"]


def test_probe_rejects_files_that_are_no_images(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("a text file named .jpg\n")
    data = _encode(_smooth_image(), ".jpg")
    (tmp_path / "header.jpg").write_bytes(data[: data.index(b"\xff\xda")])
    for name, why in (("empty.jpg", "empty file"), ("text.jpg", "UnidentifiedImageError")):
        with pytest.raises(ImageReadError) as err:
            probe_image(tmp_path / name)
        assert str(err.value) == f"cannot read image header: {tmp_path / name} ({why})"
    with pytest.raises(ImageReadError, match="cannot decode image: .*header.jpg"):
        probe_image(tmp_path / "header.jpg")  # header fine, no image data: decoded, fails
    log = ProblemLog("ds")
    assert usable_image(tmp_path / "empty.jpg", log) is None
    assert usable_image(tmp_path / "text.jpg", log) is None
    assert log.lines() == ["ds: skipped unreadable images: 2 in 2 files (empty.jpg, text.jpg)"]


def test_probe_is_not_stopped_by_pils_pixel_limit(tmp_path, monkeypatch):
    from PIL import Image

    _write_rgb(tmp_path / "big.png", _smooth_image(48, 64))
    # As if the image had more than twice PIL's limit (89 M pixels by default), which makes
    # Image.open raise DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert probe_image(tmp_path / "big.png") == ImageProbe(64, 48, "PNG", None)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_header_size_follows_the_exif_orientation_as_decoding_does(tmp_path, fmt):
    from PIL import Image

    image = Image.fromarray(np.zeros((30, 50, 3), np.uint8))  # 50 wide, 30 high
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / f"rotated.{fmt.lower()}"
    image.save(path, fmt, exif=exif.tobytes())
    decoded = read_image_array(path)
    assert decoded.shape == (50, 30, 3)  # OpenCV applies the orientation
    assert image_size(path) == (30, 50) == (decoded.shape[1], decoded.shape[0])


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

    logging.getLogger("detkit").propagate = True  # the CLI turns it off; conftest restores it
    with caplog.at_level(logging.WARNING, logger="detkit"):
        log.warn()
    assert [r.getMessage() for r in caplog.records] == log.lines()

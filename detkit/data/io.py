"""Reading images, checking them cheaply before use, and collecting dataset problems into one
summary line per kind.

Three ways to look at an image file, from cheap to thorough:

    probe_image(path)        header only (PIL) + an end-of-data check; decodes only a file
                             that looks truncated, to find out how much of it decodes
    usable_image(path, log)  the probe as every dataset loader runs it once per image:
                             unusable images are skipped and counted, partial ones counted
    decode_image(path)       the full decode (OpenCV), with what was missing, if anything

Truncated files (an interrupted download or copy) are decoded as far as their data goes,
as ``cv2.imread`` and image viewers do, and reported as "decoded partially (truncated image
data)". Why ``cv2.imdecode`` alone refuses them while ``cv2.imread`` accepts them: OpenCV
reads a file through libjpeg's stdio source, whose ``fill_input_buffer`` at the end of the
file warns "Premature end of JPEG file" and inserts a fake end-of-image marker (0xFFD9), so
the decoder finishes with the rest of the image grey (missing DCT blocks decode to level
128); a memory buffer goes through OpenCV's own source, whose ``fill_input_buffer`` returns
FALSE (suspend), which ends the decode with an error. ``decode_image`` appends that marker
to the buffer and decodes again, which gives ``cv2.imread``'s result bit for bit. PNG files
cut short (libpng refuses them in both OpenCV paths) are decoded by PIL as far as the data
goes; the missing rows are black.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import cv2
import numpy as np
import torch

from detkit.errors import ImageReadError

logger = logging.getLogger("detkit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

PathLike = Union[str, "os.PathLike[str]"]

#: The note of a file whose data ends early; ProblemLog kind ``decoded partially (<note>)``.
TRUNCATED = "truncated image data"
#: ProblemLog kinds of the image checks (loaders and ``detkit data check`` share them).
SKIPPED_UNREADABLE = "skipped unreadable images"
PARTIAL_KIND = f"decoded partially ({TRUNCATED})"

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the (empty) last chunk with its CRC
# The end marker is looked for in this many bytes at the end of a file: trailers that some
# cameras write after the image (Samsung's "SEFT" block, padding) fit in it.
_TAIL_BYTES = 1 << 16
# PIL format names whose files OpenCV decodes and whose header PIL parses reliably; a file
# of any other format is decoded once at load time to find out whether it can be used.
_OPENCV_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "DIB", "TIFF", "WEBP", "PPM", "JPEG2000"}
# Formats whose EXIF orientation OpenCV applies on decoding (IMREAD_COLOR), so that the
# header size must be swapped for orientations 5..8 (transposed) to match the pixels.
_EXIF_ORIENTED = {"JPEG", "MPO", "PNG", "WEBP"}
_ORIENTATION_TAG = 0x0112

# Files whose partial decode was already reported in this process (by a dataset load or an
# earlier read): the per-read warning is given once per file, not once per epoch.
_reported_partial: Set[str] = set()
# PIL's tolerance for truncated files and its pixel limit are module switches; they are only
# changed (and put back) under this lock.
_pil_switch_lock = threading.Lock()


def decode_image(path: PathLike) -> Tuple[np.ndarray, Optional[str]]:
    """``((H, W, 3) uint8 RGB, note)``: note is None for a complete decode and ``TRUNCATED``
    when the file ends early and only part of the image could be decoded (see the module
    docstring). Grey images are repeated to 3 channels, alpha is dropped, the EXIF
    orientation is applied. Raises ``ImageReadError`` naming the file otherwise."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot read image: {path} ({type(exc).__name__})") from None
    if data.size == 0:
        raise ImageReadError(f"cannot decode image: {path} (empty file)")
    # IMREAD_COLOR always gives 3 channels (grey is replicated, alpha dropped) and applies
    # the EXIF orientation, like the viewers the annotator used.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    note: Optional[str] = None
    if image is None:
        head = data[:8].tobytes()
        if head.startswith(_JPEG_SOI):
            # What libjpeg's stdio source (cv2.imread) does at the end of a file.
            image = cv2.imdecode(np.concatenate([data, np.frombuffer(_JPEG_EOI, np.uint8)]), cv2.IMREAD_COLOR)
            note = TRUNCATED
        elif head == _PNG_SIGNATURE:
            raw = data.tobytes()
            rgb, note = _decode_png_with_pil(raw, truncated=raw.rfind(_PNG_IEND, -_TAIL_BYTES) < 0)
            if rgb is not None:
                return rgb, note
    if image is None:
        raise ImageReadError(f"cannot decode image: {path} (not an image or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), note


def _decode_png_with_pil(data: bytes, truncated: bool) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """A PNG that libpng refuses: decoded by PIL, strictly, and for a file without its IEND
    chunk (``truncated``) then as far as the data goes (note ``TRUNCATED``; PIL's tolerance
    would also hide corrupt data in the middle, which is no partial image but an error).
    (None, None) when that fails too."""
    from PIL import Image, ImageFile, ImageOps

    for tolerant in (False, True) if truncated else (False,):
        try:
            with _pil_switch_lock:
                saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                        upright = ImageOps.exif_transpose(im)  # as OpenCV applies it
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = saved
        except Exception:  # PIL raises many types for broken data
            continue
        if upright.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: keep the high byte, as OpenCV's IMREAD_COLOR does.
            grey = (np.asarray(upright, dtype=np.uint32) >> 8).astype(np.uint8)
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
        else:
            rgb = np.asarray(upright.convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(rgb), (TRUNCATED if tolerant else None)
    return None, None


def read_image_array(path: PathLike, problems: Optional["ProblemLog"] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB (see ``decode_image``). A partial decode is counted in
    ``problems`` when given, else warned about once per file in this process."""
    image, note = decode_image(path)
    if note is not None:
        report_partial(str(path), note, problems)
    return image


def read_image(path: PathLike, problems: Optional["ProblemLog"] = None) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = read_image_array(path, problems)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def report_partial(path: str, note: str, problems: Optional["ProblemLog"] = None) -> None:
    """Counts a partially decoded file in ``problems``, or, without a log, warns once per file
    (a dataset load already reported the file: training's reads stay quiet)."""
    if problems is not None:
        problems.add(f"decoded partially ({note})", path)
    elif path not in _reported_partial:
        logger.warning("decoded partially (%s): %s (the missing part is filled in)", note, path)
    _reported_partial.add(path)


@dataclass(frozen=True)
class ImageProbe:
    """What the cheap check learnt about an image file. width/height: as decoded (EXIF
    orientation applied); format: PIL's name (JPEG, PNG, ...); partial: None, or the note of
    a file that decodes only in part (``TRUNCATED``)."""

    width: int
    height: int
    format: str
    partial: Optional[str] = None

    @property
    def size(self) -> Tuple[int, int]:
        return self.width, self.height


def _jpeg_scan_start(f) -> Optional[int]:
    """File offset of the first scan's entropy-coded data (after the first SOS segment), or
    None when the marker segments before it are broken. Reads only the header segments."""
    f.seek(0)
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        byte = f.read(1)
        if byte != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if 0xD0 <= code <= 0xD7 or code == 0x01:  # markers without a length
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return None
        (length,) = struct.unpack(">H", raw)
        if length < 2:
            return None
        if code == 0xDA:  # SOS: the entropy-coded data follows its header
            return f.tell() + length - 2
        if code == 0xD9:
            return None
        f.seek(length - 2, os.SEEK_CUR)


def _looks_truncated(f, fmt: str, file_size: int) -> bool:
    """True when a JPEG has no end-of-image marker after its first scan, or a PNG no IEND
    chunk; checks the header and the last 64 KiB only."""
    if fmt in ("JPEG", "MPO"):
        scan = _jpeg_scan_start(f)
        if scan is None or scan >= file_size:
            return True
        start = max(scan, file_size - _TAIL_BYTES)
        f.seek(start)
        # In entropy-coded data every 0xFF byte is followed by 0x00 or a restart marker, so
        # 0xFFD9 after the scan start is the end of the image (a trailer may follow it).
        return f.read().rfind(_JPEG_EOI) < 0
    if fmt == "PNG":
        f.seek(max(0, file_size - _TAIL_BYTES))
        return f.read().rfind(_PNG_IEND) < 0
    return False


def probe_image(path: PathLike) -> ImageProbe:
    """The cheap check of one image file: PIL parses the header (size, format), JPEG and PNG
    files are checked for their end-of-data marker, and only a file that fails that check
    (or whose format OpenCV may not read) is decoded, to find out whether it decodes in
    part or not at all. Raises ``ImageReadError`` naming the file for an unusable one."""
    from PIL import Image

    path = str(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            with _pil_switch_lock:
                # PIL refuses headers of more than 2 x 89 M pixels (a "decompression bomb"
                # guard for its own decoding); reading a header allocates nothing, and the
                # pixels are OpenCV's to decode (with its own limit), so large aerial or
                # slide images stay usable.
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    with Image.open(f) as im:
                        width, height = im.size
                        fmt = str(im.format or "")
                        orientation = _orientation(im) if fmt in _EXIF_ORIENTED else 1
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
            suspicious = fmt not in _OPENCV_FORMATS or _looks_truncated(f, fmt, file_size)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises many types for corrupt headers
        what = "empty file" if _is_empty(path) else type(exc).__name__
        raise ImageReadError(f"cannot read image header: {path} ({what})") from None
    if orientation in (5, 6, 7, 8):  # transposed (rotated by 90 degrees)
        width, height = height, width
    if not suspicious:
        return ImageProbe(width, height, fmt)
    image, note = decode_image(path)  # raises ImageReadError for an undecodable file
    return ImageProbe(int(image.shape[1]), int(image.shape[0]), fmt, note)


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _orientation(im) -> int:
    """The EXIF orientation tag (1..8; 1 when absent) from the header's EXIF block alone
    (``Image.getexif`` would decode a whole PNG to look for a late eXIf chunk)."""
    from PIL import Image

    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is ignored, as decoders do
        return 1
    return value if 1 <= value <= 8 else 1


def usable_image(path: PathLike, problems: "ProblemLog") -> Optional[ImageProbe]:
    """The image check every dataset loader runs once per image, before anything trains:
    ``probe_image``, with an unusable file skipped (None) and counted as "skipped unreadable
    images", and a partially decodable one kept and counted as "decoded partially (...)"."""
    try:
        probe = probe_image(path)
    except ImageReadError:
        problems.add(SKIPPED_UNREADABLE, str(path))
        return None
    if probe.partial is not None:
        report_partial(str(path), probe.partial, problems)
    return probe


def image_size(path: PathLike) -> Tuple[int, int]:
    """(width, height) as decoded, from the file header (cheap); raises ImageReadError."""
    return probe_image(path).size


def is_within(path: Path, root: Path) -> bool:
    """True when ``path``, with its ``..`` parts resolved, lies inside ``root``.

    The check is on the path as named (lexical), not on where symbolic links point: it stops
    an annotation file from naming ``../../etc/passwd``, while datasets assembled from links
    to files elsewhere (a common way to build a split) keep working.
    """
    try:
        Path(os.path.normpath(os.path.abspath(path))).relative_to(os.path.normpath(os.path.abspath(root)))
        return True
    except ValueError:
        return False


class ProblemLog:
    """Counts skipped or fixed input problems so that a dataset load emits one warning line
    per kind ("voc:train: dropped zero-area boxes: 2 in 2 files (a.xml, b.xml)") instead of
    one per box."""

    def __init__(self, name: str):
        self.name = name
        # kind -> (count, files in first-seen order)
        self.entries: "OrderedDict[str, Tuple[int, List[str]]]" = OrderedDict()

    def add(self, kind: str, file: str, count: int = 1) -> None:
        total, files = self.entries.get(kind, (0, []))
        if file not in files:
            files.append(file)
        self.entries[kind] = (total + count, files)

    def has(self, kind: str, file: str) -> bool:
        return file in self.entries.get(kind, (0, []))[1]

    def count(self, kind: str) -> int:
        return self.entries.get(kind, (0, []))[0]

    def lines(self, max_files: int = 3) -> List[str]:
        out = []
        for kind, (total, files) in self.entries.items():
            names = ", ".join(Path(f).name for f in files[:max_files])
            more = f", +{len(files) - max_files} more" if len(files) > max_files else ""
            noun = "file" if len(files) == 1 else "files"
            out.append(f"{self.name}: {kind}: {total} in {len(files)} {noun} ({names}{more})")
        return out

    def as_dict(self) -> Dict[str, Dict]:
        return {k: {"count": n, "files": f} for k, (n, f) in self.entries.items()}

    def warn(self) -> None:
        for line in self.lines():
            logger.warning(line)


def find_image(img_dir: Path, stem: str, hint: Optional[str] = None) -> Optional[Path]:
    """The image for annotation ``stem``: the annotation's own file name if it exists in
    ``img_dir``, else ``stem`` with a known image extension. None when nothing exists."""
    if hint:
        candidate = img_dir / hint
        if candidate.is_file():
            return candidate
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            candidate = img_dir / (stem + e)
            if candidate.is_file():
                return candidate
    return None

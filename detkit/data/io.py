"""Reading images and collecting dataset problems into one summary line per kind."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from detkit.errors import ImageReadError

logger = logging.getLogger("detkit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image_array(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Grey images are repeated to 3 channels, alpha is dropped."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image not found: {path}")
    # IMREAD_COLOR always gives 3 channels (grey is replicated, alpha dropped) and applies
    # the EXIF orientation, like the viewers the annotator used.
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot decode image: {path} (not an image or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = read_image_array(path)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def image_size(path) -> Tuple[int, int]:
    """(width, height) read from the file header only (cheap); raises ImageReadError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises many types for corrupt headers
        raise ImageReadError(f"cannot read image header: {path} ({type(exc).__name__})") from None


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

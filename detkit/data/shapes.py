"""The generated "shapes" dataset: detkit's embedded default, made on the spot (no downloads).

``generate_shapes(out_dir, ...)`` writes a Pascal VOC devkit folder that ``detkit.data.voc``
reads like any other:

    out_dir/
      Annotations/<id>.xml            VOC XML; bndbox in 1-based inclusive pixels
      JPEGImages/<id>.png             PNG by default (lossless: the small shapes keep exact
                                      edges); the folder keeps the devkit's name anyway
      ImageSets/Main/train.txt        one id per line; trainval.txt == train.txt
      ImageSets/Main/test.txt
      annotations/instances_{train,test}.json   COCO json, only with coco_json=True
      shapes.json                     manifest: generator version, parameters, class names

Ids are ``train_00000``, ``test_00000``, ...; the two splits are disjoint by construction.
K = 3 classes, in label order (labels 1..K): circle, square, triangle.

Keyword arguments of ``generate_shapes`` (``render_shapes_image(split, index, seed, **options)``
takes the image keywords, image_size .. noise_std, and renders one image in memory):

    num_train=200, num_test=50   images per split
    seed=0                       image i of split s is drawn from a numpy Generator seeded by
                                 (seed, s, i): the same arguments give byte-identical files,
                                 and asking for more images never changes the first ones
    image_size=(128, 192)        width and height each drawn from [min, max] (an int: fixed)
    object_size=(16, 64)         shape size in px (circle diameter, square / triangle side),
                                 drawn log-uniformly so every scale is equally common
    objects_per_image=(1, 6)     drawn uniformly; fewer when placements keep failing
    max_iou=0.3                  reject a placement whose box IoU with an earlier shape is higher
    min_visible=0.75             reject a placement that would leave an earlier shape with
                                 less than this fraction of its pixels visible
    max_rotation=20.0            squares and triangles are rotated by up to +-this (degrees)
    min_contrast=80.0            RGB distance (0..255 scale) of an object colour from the mean
                                 background under it and from the shapes it overlaps
    noise_std=6.0                Gaussian pixel noise of the background (0..255 scale)
    image_format="png"           or "jpg" (JPEG artefacts blur the exact boxes slightly)
    coco_json=False              also write annotations/instances_{train,test}.json
    overwrite=False              see "Safety"

What an image holds: a smooth random colour gradient plus low-frequency colour variation,
a few low-contrast lines and elongated blobs, and Gaussian noise; on it 1..6 flat-coloured
shapes, drawn without anti-aliasing (cv2, LINE_8). Colours are random and independent of
the class, so only the shape tells the class. Shapes lie wholly inside the image
(truncated=0, difficult=0). A later shape may cover a little of an earlier one; each box is
the tight box of the object's *visible* pixels (VOC's rule: annotate the visible extent),
taken from the drawn masks, so it is exact.

COCO json: image ids 1..N per split, ``file_name`` "<id>.png" relative to JPEGImages/,
category ids 1..K in the order above, bbox [x, y, w, h] = (xmin - 1, ymin - 1,
xmax - xmin + 1, ymax - ymin + 1) of the XML box, area = w * h, iscrowd = 0.

Safety: an ``out_dir`` whose shapes.json records the same version and parameters and whose
files are all present is reused as is (nothing rewritten); one with the same parameters but
missing files (an interrupted run) is completed by regenerating. Any other non-empty folder
raises ``FileExistsError`` unless ``overwrite=True``, which always (re)writes the generator's
own files and removes only files that an earlier shapes.json in that folder lists as its
own; files with other names (the user's) are never touched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

# Bump when the same parameters would give different files, so old folders are not reused.
SHAPES_VERSION = 1
CLASS_NAMES: Tuple[str, ...] = ("circle", "square", "triangle")
SPLITS: Tuple[str, ...] = ("train", "test")
MANIFEST = "shapes.json"

# The split is part of every image's seed, so train and test never share an image.
_SPLIT_CODE = {"train": 0, "test": 1}
# Fixed-point bits for cv2.fillPoly: sub-pixel vertices, still integer (exact) rasterisation.
_SHIFT = 4
_PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_JPG_OPTIONS = [cv2.IMWRITE_JPEG_QUALITY, 95]

Range = Union[int, float, Sequence[float]]


@dataclass
class ShapeObject:
    """One drawn shape. ``box`` is (c0, r0, c1, r1): the first and last pixel column / row
    (0-based, inclusive) of the visible pixels; VOC writes (c0 + 1, r0 + 1, c1 + 1, r1 + 1)."""

    name: str
    label: int
    colour: Tuple[int, int, int]  # RGB
    box: Tuple[int, int, int, int]
    visible_area: int  # pixels still visible after the later shapes
    full_area: int  # pixels drawn

    @property
    def voc_box(self) -> Tuple[int, int, int, int]:
        c0, r0, c1, r1 = self.box
        return c0 + 1, r0 + 1, c1 + 1, r1 + 1


@dataclass
class ShapesImage:
    """One rendered image. image / background: (H, W, 3) uint8 RGB, with and without the
    shapes; label_map: (H, W) int16, the index into ``objects`` of the shape visible at each
    pixel, -1 for background."""

    image_id: str
    image: np.ndarray
    background: np.ndarray
    label_map: np.ndarray
    objects: List[ShapeObject]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


# ----------------------------------------------------------------------------- parameters


def _range(name: str, value: Range, integer: bool) -> List:
    """A number or a (min, max) pair -> [min, max]; one-line ValueError otherwise."""
    numbers = (int, float, np.integer, np.floating)
    if isinstance(value, numbers) and not isinstance(value, bool):
        raw = [value, value]
    else:
        try:
            raw = list(value)
        except TypeError:
            raw = []
        if len(raw) != 2:
            raise ValueError(f"shapes: {name} must be a number or a (min, max) pair, got {value!r}")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, numbers) or not math.isfinite(v):
            raise ValueError(f"shapes: {name} must hold numbers, got {value!r}")
        if integer and float(v) != int(v):
            raise ValueError(f"shapes: {name} must hold whole numbers, got {value!r}")
    pair = [int(v) if integer else float(v) for v in raw]
    if pair[0] > pair[1]:
        raise ValueError(f"shapes: {name} must be (min, max) with min <= max, got {value!r}")
    return pair


def _number(name: str, value) -> float:
    numbers = (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, numbers) or not math.isfinite(value):
        raise ValueError(f"shapes: {name} must be a finite number, got {value!r}")
    return float(value)


def _params(
    num_train,
    num_test,
    seed,
    image_size,
    object_size,
    objects_per_image,
    max_iou,
    min_visible,
    max_rotation,
    min_contrast,
    noise_std,
    image_format,
) -> Dict:
    """Checks and normalises the generator's parameters into the manifest's JSON form."""
    for name, value in (("num_train", num_train), ("num_test", num_test), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"shapes: {name} must be a non-negative integer, got {value!r}")
    p = {
        "num_train": int(num_train),
        "num_test": int(num_test),
        "seed": int(seed),
        "image_size": _range("image_size", image_size, True),
        "object_size": _range("object_size", object_size, False),
        "objects_per_image": _range("objects_per_image", objects_per_image, True),
        "max_iou": _number("max_iou", max_iou),
        "min_visible": _number("min_visible", min_visible),
        "max_rotation": _number("max_rotation", max_rotation),
        "min_contrast": _number("min_contrast", min_contrast),
        "noise_std": _number("noise_std", noise_std),
        "image_format": str(image_format).lower().lstrip("."),
    }
    if p["image_format"] == "jpeg":
        p["image_format"] = "jpg"
    if p["image_format"] not in ("png", "jpg"):
        raise ValueError(f"shapes: image_format must be 'png' or 'jpg', got {image_format!r}")
    if p["image_size"][0] < 16:
        raise ValueError(f"shapes: image_size must be at least 16 px, got {image_size!r}")
    lo, hi = p["object_size"]
    if lo < 4:
        raise ValueError(f"shapes: object_size must be at least 4 px, got {object_size!r}")
    # A square rotated by 45 degrees spans sqrt(2) x its side; it must still fit.
    if hi * math.sqrt(2) > p["image_size"][0] - 2:
        raise ValueError(
            f"shapes: object_size max {hi:g} does not fit the smallest image "
            f"({p['image_size'][0]} px; need max * 1.42 <= image size - 2)"
        )
    if p["objects_per_image"][0] < 0:
        raise ValueError(f"shapes: objects_per_image must be >= 0, got {objects_per_image!r}")
    if not 0.0 <= p["max_iou"] <= 1.0:
        raise ValueError(f"shapes: max_iou must be in [0, 1], got {max_iou!r}")
    if not 0.0 < p["min_visible"] <= 1.0:
        raise ValueError(f"shapes: min_visible must be in (0, 1], got {min_visible!r}")
    if not 0.0 <= p["max_rotation"] <= 180.0:
        raise ValueError(f"shapes: max_rotation must be in [0, 180] degrees, got {max_rotation!r}")
    if not 0.0 <= p["min_contrast"] <= 400.0:
        raise ValueError(f"shapes: min_contrast must be in [0, 400], got {min_contrast!r}")
    if not 0.0 <= p["noise_std"] <= 100.0:
        raise ValueError(f"shapes: noise_std must be in [0, 100], got {noise_std!r}")
    return p


# ----------------------------------------------------------------------------- drawing


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, amplitude: float) -> np.ndarray:
    """(h, w, 3) low-frequency colour variation: a (cells+1)^2 grid of Gaussian values,
    bilinearly interpolated. Plain numpy arithmetic (no SIMD transcendental functions, no cv2
    resize), so the result is bit-identical on every machine."""
    grid = rng.normal(0.0, amplitude, (cells + 1, cells + 1, 3))
    ys = np.arange(h) * (cells / max(h - 1, 1))
    xs = np.arange(w) * (cells / max(w - 1, 1))
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _near_colour(rng: np.random.Generator, canvas: np.ndarray, x: int, y: int) -> Tuple[float, ...]:
    """A colour 10..25 RGB units away from the canvas at (x, y): clutter the detector must
    learn to ignore, faint enough never to be mistaken for an object."""
    direction = rng.normal(0.0, 1.0, 3)
    direction /= max(float(np.sqrt((direction**2).sum())), 1e-6)
    colour = canvas[y, x] + direction * rng.uniform(10.0, 25.0)
    return tuple(float(c) for c in np.clip(colour, 0.0, 255.0))


def _background(rng: np.random.Generator, h: int, w: int, noise_std: float) -> np.ndarray:
    """(h, w, 3) uint8 RGB: gradient + smooth variation + low-contrast clutter + noise."""
    base = rng.uniform(40.0, 215.0, 3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    delta = rng.normal(0.0, 40.0, 3)  # colour change from one side of the image to the other
    scale = float(max(h, w))
    ys = (np.arange(h) - (h - 1) / 2.0) / scale
    xs = (np.arange(w) - (w - 1) / 2.0) / scale
    t = xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle)
    canvas = base + t[..., None] * delta + _smooth_field(rng, h, w, 3, 15.0)
    canvas = np.clip(canvas, 0.0, 255.0).astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = (int(v) for v in rng.integers(0, w, 2))
        y0, y1 = (int(v) for v in rng.integers(0, h, 2))
        colour = _near_colour(rng, canvas, (x0 + x1) // 2, (y0 + y1) // 2)
        cv2.line(canvas, (x0, y0), (x1, y1), colour, int(rng.integers(1, 3)), cv2.LINE_8)
    # Elongated blobs only: a faint round blob would look like a faint circle.
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        a = int(rng.integers(6, 30))
        b = max(1, int(a * rng.uniform(0.2, 0.45)))
        colour = _near_colour(rng, canvas, cx, cy)
        cv2.ellipse(canvas, (cx, cy), (a, b), float(rng.uniform(0.0, 180.0)), 0.0, 360.0, colour, -1, cv2.LINE_8)
    noisy = canvas + rng.normal(0.0, noise_std, canvas.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _polygon(name: str, size: float, angle_deg: float) -> np.ndarray:
    """(P, 2) float vertices around the origin: a square of side ``size`` or an equilateral
    triangle of side ``size`` (apex up at angle 0), rotated by ``angle_deg``."""
    if name == "square":
        h = size / 2.0
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    else:
        r = size / math.sqrt(3.0)  # circumradius of an equilateral triangle
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90.0, 30.0, 150.0)]
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([(x * c - y * s, x * s + y * c) for x, y in pts], dtype=np.float64)


def _shape_mask(
    rng: np.random.Generator, name: str, size: float, angle_deg: float, h: int, w: int
) -> Optional[np.ndarray]:
    """(h, w) bool mask of one shape placed at a random position wholly inside the image,
    drawn without anti-aliasing; None when it cannot fit."""
    mask = np.zeros((h, w), np.uint8)
    if name == "circle":
        r = max(2, int(round((size - 1) / 2.0)))  # spans 2r + 1 pixels
        if 2 * r + 1 > min(h, w):
            return None
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        cv2.circle(mask, (cx, cy), r, 1, -1, cv2.LINE_8)
    else:
        pts = _polygon(name, size, angle_deg)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        # Centre range that keeps every vertex within pixel centres 0..w-1 / 0..h-1.
        if hi[0] - lo[0] > w - 1 or hi[1] - lo[1] > h - 1:
            return None
        cx = rng.uniform(-lo[0], (w - 1) - hi[0])
        cy = rng.uniform(-lo[1], (h - 1) - hi[1])
        fixed = np.rint((pts + (cx, cy)) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


def _tight_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(c0, r0, c1, r1): first/last column and row (0-based, inclusive) of a non-empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _iou(a: Tuple[int, ...], b: Tuple[int, ...]) -> float:
    """IoU of two inclusive pixel boxes (c0, r0, c1, r1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def _pick_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray], min_contrast: float) -> np.ndarray:
    """A random RGB colour at least ``min_contrast`` away from every colour in ``avoid``
    (the mean background under the shape, the shapes it overlaps); the best of 32 tries
    when none is far enough."""
    best, best_d = None, -1.0
    for _ in range(32):
        colour = rng.integers(0, 256, 3)
        d = min(float(np.sqrt(((colour - a) ** 2).sum())) for a in avoid)
        if d >= min_contrast:
            return colour.astype(np.uint8)
        if d > best_d:
            best, best_d = colour, d
    return best.astype(np.uint8)


def _render(rng: np.random.Generator, p: Dict, image_id: str) -> ShapesImage:
    """Draws one image from ``rng`` with the (normalised) parameters ``p``."""
    w = int(rng.integers(p["image_size"][0], p["image_size"][1] + 1))
    h = int(rng.integers(p["image_size"][0], p["image_size"][1] + 1))
    background = _background(rng, h, w, p["noise_std"])
    image = background.copy()
    label_map = np.full((h, w), -1, np.int16)
    want = int(rng.integers(p["objects_per_image"][0], p["objects_per_image"][1] + 1))
    log_lo, log_hi = (math.log(s) for s in p["object_size"])
    labels: List[int] = []
    colours: List[np.ndarray] = []
    full_boxes: List[Tuple[int, int, int, int]] = []
    full_areas: List[int] = []
    visible: List[int] = []
    attempts = 0
    while len(labels) < want and attempts < 30 * want:
        attempts += 1
        label = int(rng.integers(1, len(CLASS_NAMES) + 1))
        size = math.exp(rng.uniform(log_lo, log_hi))
        angle = rng.uniform(-p["max_rotation"], p["max_rotation"])
        mask = _shape_mask(rng, CLASS_NAMES[label - 1], size, angle, h, w)
        if mask is None or not mask.any():
            continue
        box = _tight_box(mask)
        if any(_iou(box, b) > p["max_iou"] for b in full_boxes):
            continue
        under = label_map[mask]
        covered = np.bincount(under[under >= 0], minlength=len(labels))
        hit = np.flatnonzero(covered)
        # Keep every earlier shape recognisable: most of it must stay visible.
        if any(visible[j] - covered[j] < p["min_visible"] * full_areas[j] for j in hit):
            continue
        avoid = [background[mask].mean(axis=0)] + [colours[j] for j in hit]
        colour = _pick_colour(rng, avoid, p["min_contrast"])
        image[mask] = colour
        label_map[mask] = len(labels)
        for j in hit:
            visible[j] -= int(covered[j])
        labels.append(label)
        colours.append(colour)
        full_boxes.append(box)
        full_areas.append(int(mask.sum()))
        visible.append(full_areas[-1])
    objects = [
        ShapeObject(
            name=CLASS_NAMES[label - 1],
            label=label,
            colour=tuple(int(c) for c in colours[j]),
            # The visible pixels, not the full shape: later shapes may cover an edge.
            box=_tight_box(label_map == j),
            visible_area=visible[j],
            full_area=full_areas[j],
        )
        for j, label in enumerate(labels)
    ]
    return ShapesImage(image_id, image, background, label_map, objects)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One generator per image, keyed by (seed, split, index): images are independent of how
    # many others are generated and of the order they are generated in.
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def image_id_for(split: str, index: int) -> str:
    """The id (file stem) of image ``index`` of ``split``: "train_00000", "test_00012", ..."""
    return f"{split}_{index:05d}"


def render_shapes_image(split: str = "train", index: int = 0, seed: int = 0, **options) -> ShapesImage:
    """Renders image ``index`` of ``split`` exactly as ``generate_shapes`` writes it, in memory.

    options: the image keywords of ``generate_shapes`` (image_size, object_size,
    objects_per_image, max_iou, min_visible, max_rotation, min_contrast, noise_std);
    the defaults are the same.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"shapes: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"shapes: index must be a non-negative integer, got {index!r}")
    allowed = set(_IMAGE_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        known = ", ".join(_IMAGE_OPTIONS)
        raise TypeError(f"render_shapes_image: unknown option {unknown[0]!r} (known: {known})")
    kwargs = {**_IMAGE_OPTIONS, **options}
    p = _params(0, 0, seed, image_format="png", **kwargs)
    return _render(_image_rng(seed, split, index), p, image_id_for(split, index))


# ----------------------------------------------------------------------------- files


def _voc_xml(image_id: str, file_name: str, width: int, height: int, objects: Sequence[ShapeObject]) -> str:
    """Standard VOC XML (tab-indented like the devkit's own files); written by hand so the
    bytes never depend on the XML library's version."""
    lines = [
        "<annotation>",
        "\t<folder>shapes</folder>",
        f"\t<filename>{file_name}</filename>",
        "\t<source>",
        "\t\t<database>detkit shapes</database>",
        f"\t\t<annotation>detkit.data.shapes v{SHAPES_VERSION}</annotation>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.voc_box
        lines += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _coco_image_and_annotations(coco_id: int, file_name: str, shapes: ShapesImage, first_ann_id: int):
    image = {"id": coco_id, "file_name": file_name, "width": shapes.width, "height": shapes.height}
    anns = []
    for k, obj in enumerate(shapes.objects):
        xmin, ymin, xmax, ymax = obj.voc_box
        # The continuous box the XML maps to: (xmin - 1, ymin - 1) .. (xmax, ymax).
        w, h = float(xmax - xmin + 1), float(ymax - ymin + 1)
        anns.append(
            {
                "id": first_ann_id + k,
                "image_id": coco_id,
                "category_id": obj.label,
                "bbox": [float(xmin - 1), float(ymin - 1), w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return image, anns


def _dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _own_files(p: Dict, coco_json: bool) -> List[str]:
    """Paths (relative to out_dir, '/'-separated) of every file the generator writes, except
    the manifest itself."""
    files = []
    for split, n in (("train", p["num_train"]), ("test", p["num_test"])):
        for i in range(int(n)):
            stem = image_id_for(split, i)
            files += [f"Annotations/{stem}.xml", f"JPEGImages/{stem}.{p['image_format']}"]
    files += [f"ImageSets/Main/{s}.txt" for s in ("train", "trainval", "test")]
    if coco_json:
        files += [f"annotations/instances_{s}.json" for s in SPLITS]
    return files


def read_manifest(out_dir) -> Optional[Dict]:
    """The shapes.json of ``out_dir`` as a dict, or None when there is none or it is not a
    shapes manifest (unreadable, not JSON, another generator's)."""
    path = Path(out_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != "detkit.data.shapes":
        return None
    if not isinstance(data.get("params"), dict):
        return None
    return data


def _manifest(p: Dict, coco_json: bool, complete: bool) -> Dict:
    return {
        "generator": "detkit.data.shapes",
        "version": SHAPES_VERSION,
        "class_names": list(CLASS_NAMES),
        "params": p,
        "coco_json": bool(coco_json),
        # False while writing: a folder left by an interrupted run is never reused as is.
        "complete": bool(complete),
    }


def generate_shapes(
    out_dir,
    num_train: int = 200,
    num_test: int = 50,
    seed: int = 0,
    image_size: Range = (128, 192),
    object_size: Range = (16, 64),
    objects_per_image: Range = (1, 6),
    max_iou: float = 0.3,
    min_visible: float = 0.75,
    max_rotation: float = 20.0,
    min_contrast: float = 80.0,
    noise_std: float = 6.0,
    image_format: str = "png",
    coco_json: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes the shapes dataset as a VOC devkit folder at ``out_dir`` and returns its path.

    See the module docstring for the layout, the meaning of every keyword and the rules for
    reusing or refusing an existing folder. Raises ValueError (one line) for bad parameters
    and FileExistsError (one line) for a non-empty folder it will not write into.
    """
    p = _params(
        num_train,
        num_test,
        seed,
        image_size,
        object_size,
        objects_per_image,
        max_iou,
        min_visible,
        max_rotation,
        min_contrast,
        noise_std,
        image_format,
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"shapes: {out} exists and is not a folder")
    files = _own_files(p, coco_json)
    old = read_manifest(out) if out.is_dir() else None
    same = old is not None and old.get("version") == SHAPES_VERSION and old["params"] == p
    complete = same and old.get("complete") is True
    if not overwrite and complete and all((out / f).is_file() for f in files):
        return out
    if not same and out.is_dir() and any(out.iterdir()) and not overwrite:
        if old is not None:
            if old.get("version") != SHAPES_VERSION:
                why = f"holds a shapes dataset of generator version {old.get('version')} (now {SHAPES_VERSION})"
            else:
                old_p = old["params"]
                keys = sorted(k for k in set(p) | set(old_p) if p.get(k) != old_p.get(k))
                why = f"holds a shapes dataset made with other parameters ({', '.join(keys)})"
        elif (out / MANIFEST).exists():
            why = f"has a {MANIFEST} that is not a readable shapes manifest"
        else:
            why = f"is not empty and holds no {MANIFEST}"
        raise FileExistsError(f"shapes: {out} {why}; choose another folder or pass overwrite=True")

    # Files an earlier generation listed as its own but this one will not write: remove them,
    # so that loaders globbing Annotations/ see only this dataset. Nothing else is touched.
    if old is not None:
        try:
            stale = set(_own_files(old["params"], bool(old.get("coco_json")))) - set(files)
        except (KeyError, TypeError, ValueError):
            stale = set()
        for rel in sorted(stale):
            path = out / rel
            if path.is_file():
                path.unlink()

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_bytes(_dump_json(_manifest(p, coco_json, complete=False)))

    ext = p["image_format"]
    encode_options = _PNG_OPTIONS if ext == "png" else _JPG_OPTIONS
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASS_NAMES)]
    for split, n in (("train", p["num_train"]), ("test", p["num_test"])):
        ids: List[str] = []
        coco_images, coco_anns = [], []
        for i in range(n):
            image_id = image_id_for(split, i)
            shapes = _render(_image_rng(p["seed"], split, i), p, image_id)
            file_name = f"{image_id}.{ext}"
            bgr = cv2.cvtColor(shapes.image, cv2.COLOR_RGB2BGR)
            ok, encoded = cv2.imencode(f".{ext}", bgr, encode_options)
            if not ok:
                raise RuntimeError(f"shapes: cv2 could not encode {file_name}")
            (out / "JPEGImages" / file_name).write_bytes(encoded.tobytes())
            xml = _voc_xml(image_id, file_name, shapes.width, shapes.height, shapes.objects)
            (out / "Annotations" / f"{image_id}.xml").write_bytes(xml.encode("utf-8"))
            ids.append(image_id)
            if coco_json:
                image, anns = _coco_image_and_annotations(i + 1, file_name, shapes, len(coco_anns) + 1)
                coco_images.append(image)
                coco_anns += anns
        listing = "".join(f"{s}\n" for s in ids).encode("utf-8")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_bytes(listing)
        if split == "train":
            (out / "ImageSets" / "Main" / "trainval.txt").write_bytes(listing)
        if coco_json:
            (out / "annotations").mkdir(exist_ok=True)
            coco = {
                "info": {"description": f"detkit shapes {split}", "version": str(SHAPES_VERSION)},
                "licenses": [],
                "images": coco_images,
                "annotations": coco_anns,
                "categories": categories,
            }
            (out / "annotations" / f"instances_{split}.json").write_bytes(_dump_json(coco))
    (out / MANIFEST).write_bytes(_dump_json(_manifest(p, coco_json, complete=True)))
    return out


def _image_option_defaults() -> Dict:
    import inspect

    sig = inspect.signature(generate_shapes)
    names = (
        "image_size",
        "object_size",
        "objects_per_image",
        "max_iou",
        "min_visible",
        "max_rotation",
        "min_contrast",
        "noise_std",
    )
    return {n: sig.parameters[n].default for n in names}


# The image keywords of generate_shapes and their defaults (one source: its signature).
_IMAGE_OPTIONS = _image_option_defaults()

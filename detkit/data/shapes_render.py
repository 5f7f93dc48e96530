"""The shapes renderer: options + a random generator -> one image and its objects, in memory.

Pure: no files (``detkit.data.shapes_files`` writes them, ``detkit.data.shapes`` ties the two
together). Everything an image holds is drawn from the one ``numpy.random.Generator`` it is
given (``image_rng``: seeded by (seed, split, index)), in a fixed order, so the same options
give the same pixels on every machine.

What an image holds: a smooth random colour gradient plus low-frequency colour variation, a
few low-contrast lines and elongated blobs, and Gaussian noise; on it flat-coloured shapes
(``ShapesConfig.classes``), drawn without anti-aliasing (cv2, LINE_8). Colours are random
and independent of the class, so only the shape tells the class. A later shape may cover a
little of an earlier one (``min_visible``); each box is the tight box of the object's
*visible* pixels (VOC's rule: annotate the visible extent), taken from the drawn masks, so
it is exact. With ``max_outside > 0`` a shape may also reach past the image border: its box
is then the visible part inside the image (clipped) and the object is ``truncated``.

Shorthand: H, W image height and width; boxes are (c0, r0, c1, r1), the first and last
pixel column / row (0-based, inclusive) of a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detkit.schema import SHAPE_CLASSES, ShapesConfig

SPLITS: Tuple[str, ...] = ("train", "test")
# The split is part of every image's seed, so train and test never share an image.
_SPLIT_CODE = {"train": 0, "test": 1}
# Fixed-point bits for cv2.fillPoly: sub-pixel vertices, still integer (exact) rasterisation.
_SHIFT = 4
# Placements tried per wanted object before an image settles for fewer objects.
_ATTEMPTS_PER_OBJECT = 30
# (width, height) draws tried for an aspect_ratio range before the fallback.
_SIZE_ATTEMPTS = 1000

Box = Tuple[int, int, int, int]


@dataclass
class ShapeObject:
    """One drawn shape. ``box`` is (c0, r0, c1, r1): the first and last pixel column / row
    (0-based, inclusive) of the visible pixels; VOC writes (c0 + 1, r0 + 1, c1 + 1, r1 + 1).
    ``full_box`` is the same for all its pixels inside the image (before later shapes
    covered any); ``size`` the drawn size (circle diameter, square / triangle side)."""

    name: str
    label: int  # 1..K, the position of name in ShapesConfig.classes
    colour: Tuple[int, int, int]  # RGB
    box: Box
    visible_area: int  # pixels still visible after the later shapes
    full_area: int  # pixels drawn inside the image
    full_box: Box = (0, 0, 0, 0)
    size: float = 0.0
    outside_area: int = 0  # pixels of the shape beyond the image border (max_outside > 0)

    @property
    def truncated(self) -> bool:
        """Part of the shape lies outside the image (VOC's ``truncated``)."""
        return self.outside_area > 0

    @property
    def voc_box(self) -> Box:
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


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: keyed by (seed, split, index), so images
    are independent of how many others are generated and of the order they are made in."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"shapes: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"shapes: index must be a non-negative integer, got {index!r}")
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def image_id_for(split: str, index: int) -> str:
    """The id (file stem) of image ``index`` of ``split``: "train_00000", "test_00012", ..."""
    return f"{split}_{index:05d}"


# ----------------------------------------------------------------------------- background


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


def _near_colour(rng: np.random.Generator, canvas: np.ndarray, x: int, y: int) -> Tuple[float, float, float]:
    """A colour 10..25 RGB units away from the canvas at (x, y): clutter the detector must
    learn to ignore, faint enough never to be mistaken for an object."""
    direction = rng.normal(0.0, 1.0, 3)
    direction /= max(float(np.sqrt((direction**2).sum())), 1e-6)
    colour = np.clip(canvas[y, x] + direction * rng.uniform(10.0, 25.0), 0.0, 255.0)
    return float(colour[0]), float(colour[1]), float(colour[2])


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


# ----------------------------------------------------------------------------- shapes


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


def _circle_radius(size: float) -> int:
    return max(2, int(round((size - 1) / 2.0)))  # the circle spans 2r + 1 pixels


@dataclass
class _Placed:
    """A shape's pixels inside the image: ``mask`` is the (mh, mw) bool window of the image
    starting at column x0, row y0 (the shape's bounding window, cut to the image).
    ``outside``: pixels of the shape beyond the image border."""

    mask: np.ndarray
    x0: int
    y0: int
    outside: int = 0

    @property
    def window(self) -> Tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.mask.shape[0]), slice(self.x0, self.x0 + self.mask.shape[1])


def _rasterise(name: str, size: float, angle_deg: float, cx: float, cy: float) -> _Placed:
    """The whole shape centred at (cx, cy), without anti-aliasing, on a canvas of its own.

    Drawing on a small canvas gives the same pixels as drawing on the image: it shifts the
    shape by whole pixels, which leaves cv2's integer (fixed-point) rasterisation unchanged."""
    if name == "circle":
        r = _circle_radius(size)
        local = np.zeros((2 * r + 1, 2 * r + 1), np.uint8)
        cv2.circle(local, (r, r), r, 1, -1, cv2.LINE_8)
        return _Placed(local.astype(bool), int(cx) - r, int(cy) - r)
    pts = _polygon(name, size, angle_deg) + (cx, cy)
    fixed = np.rint(pts * (1 << _SHIFT)).astype(np.int32)
    x0, y0 = (int(v) - 1 for v in np.floor(pts.min(axis=0)))
    x1, y1 = (int(v) + 1 for v in np.ceil(pts.max(axis=0)))
    local = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(local, [fixed - np.array([x0, y0], np.int32) * (1 << _SHIFT)], 1, cv2.LINE_8, _SHIFT)
    return _Placed(local.astype(bool), x0, y0)


def _crop_to_image(shape: _Placed, h: int, w: int) -> _Placed:
    """The part of a rasterised shape inside the (h, w) image, counting the rest."""
    c0, r0 = max(shape.x0, 0), max(shape.y0, 0)
    c1, r1 = min(shape.x0 + shape.mask.shape[1], w), min(shape.y0 + shape.mask.shape[0], h)
    total = int(shape.mask.sum())
    inside = shape.mask[max(r0 - shape.y0, 0) : max(r1 - shape.y0, 0), max(c0 - shape.x0, 0) : max(c1 - shape.x0, 0)]
    return _Placed(inside, c0, r0, total - int(inside.sum()))


def _place_inside(
    rng: np.random.Generator, name: str, size: float, angle_deg: float, h: int, w: int, near=None
) -> Optional[_Placed]:
    """One shape at a random position wholly inside the image (or as near to ``near``, an
    (x, y) point, as that allows); None when it cannot fit."""
    if name == "circle":
        r = _circle_radius(size)
        if 2 * r + 1 > min(h, w):
            return None
        if near is None:
            col, row = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        else:
            col = int(np.clip(round(near[0]), r, w - r - 1))
            row = int(np.clip(round(near[1]), r, h - r - 1))
        return _rasterise(name, size, angle_deg, col, row)
    pts = _polygon(name, size, angle_deg)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # Centre range that keeps every vertex within pixel centres 0..w-1 / 0..h-1.
    if hi[0] - lo[0] > w - 1 or hi[1] - lo[1] > h - 1:
        return None
    if near is None:
        cx = rng.uniform(-lo[0], (w - 1) - hi[0])
        cy = rng.uniform(-lo[1], (h - 1) - hi[1])
    else:
        cx = float(np.clip(near[0], -lo[0], (w - 1) - hi[0]))
        cy = float(np.clip(near[1], -lo[1], (h - 1) - hi[1]))
    # The canvas has a pixel of margin that may reach past the border; the shape does not.
    return _crop_to_image(_rasterise(name, size, angle_deg, cx, cy), h, w)


def _place_crossing(
    rng: np.random.Generator, name: str, size: float, angle_deg: float, h: int, w: int, max_outside: float, near=None
) -> Optional[_Placed]:
    """One shape centred anywhere in the image (or at ``near``), so that it may reach past
    the border; None when more than ``max_outside`` of its pixels would lie outside."""
    cx: float
    cy: float
    if near is not None:
        cx, cy = float(np.clip(near[0], 0.0, w - 1.0)), float(np.clip(near[1], 0.0, h - 1.0))
    elif name == "circle":
        cx, cy = float(rng.integers(0, w)), float(rng.integers(0, h))
    else:
        cx, cy = float(rng.uniform(0.0, w - 1.0)), float(rng.uniform(0.0, h - 1.0))
    if name == "circle":  # circles are drawn at whole pixels
        cx, cy = float(round(cx)), float(round(cy))
    placed = _crop_to_image(_rasterise(name, size, angle_deg, cx, cy), h, w)
    inside = int(placed.mask.sum())
    if inside == 0 or inside < (1.0 - max_outside) * (inside + placed.outside):
        return None
    return placed


def _tight_box(mask: np.ndarray) -> Box:
    """(c0, r0, c1, r1): first/last column and row (0-based, inclusive) of a non-empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
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
    best, best_d = np.zeros(3, np.int64), -1.0
    for _ in range(32):
        colour = rng.integers(0, 256, 3)
        d = min(float(np.sqrt(((colour - a) ** 2).sum())) for a in avoid)
        if d >= min_contrast:
            return colour.astype(np.uint8)
        if d > best_d:
            best, best_d = colour, d
    return best.astype(np.uint8)


def _image_size(rng: np.random.Generator, options: ShapesConfig) -> Tuple[int, int]:
    """(width, height), each uniform in image_size; with aspect_ratio, pairs whose height /
    width lies outside it are drawn again (uniform over the pairs that fit)."""
    lo, hi = options.image_size
    w = int(rng.integers(lo, hi + 1))
    h = int(rng.integers(lo, hi + 1))
    if options.aspect_ratio is None:
        return w, h
    a_lo, a_hi = options.aspect_ratio
    for _ in range(_SIZE_ATTEMPTS):
        if a_lo <= h / w <= a_hi:
            return w, h
        w = int(rng.integers(lo, hi + 1))
        h = int(rng.integers(lo, hi + 1))
    # Only for a sliver of an allowed region (ShapesConfig checks that one exists): the
    # height nearest to a square image that fits, for the last width drawn.
    h = int(np.clip(round(w * min(max(1.0, a_lo), a_hi)), lo, hi))
    return w, h


def _near_earlier(rng: np.random.Generator, boxes: Sequence[Box], size: float) -> Tuple[float, float]:
    """A point near a randomly chosen earlier shape: its box centre moved by up to 60 % of
    (its half extent + the new shape's half size) along each axis, so that the shapes
    overlap often without sitting on top of each other."""
    c0, r0, c1, r1 = boxes[int(rng.integers(0, len(boxes)))]
    reach = 0.6 * (np.array([c1 - c0 + 1, r1 - r0 + 1], float) / 2.0 + size / 2.0)
    dx, dy = rng.uniform(-1.0, 1.0, 2) * reach
    return (c0 + c1) / 2.0 + float(dx), (r0 + r1) / 2.0 + float(dy)


def render_image(options: ShapesConfig, rng: np.random.Generator, image_id: str) -> ShapesImage:
    """Draws one image from ``rng`` with ``options`` (see the module docstring)."""
    w, h = _image_size(rng, options)
    background = _background(rng, h, w, options.noise_std)
    image = background.copy()
    label_map = np.full((h, w), -1, np.int16)
    lo_n, hi_n = options.objects_per_image
    want = int(rng.integers(lo_n, hi_n + 1))
    log_lo, log_hi = (math.log(s) for s in options.object_size)
    classes = options.classes
    labels: List[int] = []
    colours: List[np.ndarray] = []
    sizes: List[float] = []
    full_boxes: List[Box] = []
    full_areas: List[int] = []
    outside: List[int] = []
    visible: List[int] = []
    attempts = 0
    while len(labels) < want and attempts < _ATTEMPTS_PER_OBJECT * want:
        attempts += 1
        label = int(rng.integers(1, len(classes) + 1))
        size = math.exp(rng.uniform(log_lo, log_hi))
        angle = rng.uniform(-options.max_rotation, options.max_rotation)
        near = None
        if options.cluster > 0.0 and full_boxes and rng.random() < options.cluster:
            near = _near_earlier(rng, full_boxes, size)
        name = classes[label - 1]
        if options.max_outside > 0.0:
            placed = _place_crossing(rng, name, size, angle, h, w, options.max_outside, near)
        else:
            placed = _place_inside(rng, name, size, angle, h, w, near)
        if placed is None or not placed.mask.any():
            continue
        c0, r0, c1, r1 = _tight_box(placed.mask)
        box = (c0 + placed.x0, r0 + placed.y0, c1 + placed.x0, r1 + placed.y0)
        if any(box_iou(box, b) > options.max_iou for b in full_boxes):
            continue
        # Everything below works on the shape's window of the image (same pixels, same order).
        mask, window = placed.mask, placed.window
        under = label_map[window][mask]
        covered = np.bincount(under[under >= 0], minlength=len(labels))
        hit = np.flatnonzero(covered)
        # Keep every earlier shape recognisable: most of it must stay visible.
        if any(visible[j] - covered[j] < options.min_visible * full_areas[j] for j in hit):
            continue
        avoid = [background[window][mask].mean(axis=0)] + [colours[j] for j in hit]
        colour = _pick_colour(rng, avoid, options.min_contrast)
        image[window][mask] = colour
        label_map[window][mask] = len(labels)
        for j in hit:
            visible[j] -= int(covered[j])
        labels.append(label)
        colours.append(colour)
        sizes.append(size)
        full_boxes.append(box)
        full_areas.append(int(mask.sum()))
        outside.append(placed.outside)
        visible.append(full_areas[-1])
    objects = []
    for k, label in enumerate(labels):
        # The visible pixels, not the full shape: later shapes may cover an edge. They lie
        # within the full box, so only that part of the label map is searched.
        c0, r0, c1, r1 = full_boxes[k]
        vc0, vr0, vc1, vr1 = _tight_box(label_map[r0 : r1 + 1, c0 : c1 + 1] == k)
        objects.append(
            ShapeObject(
                name=classes[label - 1],
                label=label,
                colour=(int(colours[k][0]), int(colours[k][1]), int(colours[k][2])),
                box=(vc0 + c0, vr0 + r0, vc1 + c0, vr1 + r0),
                visible_area=visible[k],
                full_area=full_areas[k],
                full_box=full_boxes[k],
                size=sizes[k],
                outside_area=outside[k],
            )
        )
    return ShapesImage(image_id, image, background, label_map, objects)


# Re-exported for readers of the renderer alone: the shapes it can draw.
CLASS_NAMES: Tuple[str, ...] = SHAPE_CLASSES

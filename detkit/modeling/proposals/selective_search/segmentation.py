"""Selective Search, step 1: colour spaces and the initial regions.

Uijlings et al., "Selective Search for Object Recognition", IJCV 2013, Sec. 3.1 and 3.2.1:
the image is converted to one of several colour spaces (a diversification strategy) and
over-segmented with Felzenszwalb & Huttenlocher's graph method (IJCV 2004); the regions of
that over-segmentation are the leaves of the grouping hierarchy.

The segmentation is split where Felzenszwalb's method allows sharing: smoothing and the
sorted pixel graph depend only on the image and sigma (``pixel_graph``, most of the work:
one sort of about 4 HW edges), the threshold k only enters the merge loop (``segment_graph``,
compiled with numba in ``fh_kernel``). Selective Search segments each colour space at up to
four k, so it builds one graph per colour space. The label maps are identical to
``skimage.segmentation.felzenszwalb``'s on the same smoothed image (tested).

Shapes: H x W image, C channels of the colour space, N initial regions, E adjacent pairs.
A *label map* is (H, W) int64 with every value in 0..N-1 used. Region boxes are int64 xyxy
with exclusive ends (x1 <= x < x2), the convention of ``detkit.structures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from detkit.errors import SelectiveSearchError

# Canonical names as the paper writes them; lookups are case-insensitive.
COLOUR_SPACES = ("RGB", "HSV", "Lab", "rgI", "H", "I")
_CANONICAL = {name.lower(): name for name in COLOUR_SPACES}


def canonical_colour_space(name: str) -> str:
    """'hsv' -> 'HSV', 'rgi' -> 'rgI'; unknown names raise with the list of valid ones."""
    key = str(name).lower()
    if key not in _CANONICAL:
        raise SelectiveSearchError(f"unknown colour space {name!r}; expected one of {', '.join(COLOUR_SPACES)}")
    return _CANONICAL[key]


def convert_colour(image: np.ndarray, space: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, C) uint8 in ``space``, every channel spread over 0..255.

    Keeping all spaces in 0..255 matters twice: Felzenszwalb's threshold k is defined for
    0..255 intensities (skimage rescales it the same way), and the 25 colour bins then cut
    every channel into equal slices. Hue uses OpenCV's *_FULL variant (0..255, not 0..179).
    """
    space = canonical_colour_space(space)
    if space == "RGB":
        return image
    if space in ("HSV", "H"):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        return hsv if space == "HSV" else hsv[:, :, :1].copy()
    if space == "Lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2Lab)
    if space == "I":
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    # rgI: normalised r and g (invariant to shading) plus intensity, paper Table 1.
    rgb = image.astype(np.float32)
    total = rgb.sum(axis=2)
    # A black pixel has no chromaticity; call it grey (1/3, 1/3) rather than divide by 0.
    safe = np.where(total > 0, total, 1.0)
    r = np.where(total > 0, rgb[:, :, 0] / safe, 1.0 / 3.0)
    g = np.where(total > 0, rgb[:, :, 1] / safe, 1.0 / 3.0)
    out = np.stack([r * 255.0, g * 255.0, total / 3.0], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def initial_regions(image: np.ndarray, k: float, sigma: float = 0.8, min_size: Optional[int] = None) -> np.ndarray:
    """Felzenszwalb-Huttenlocher over-segmentation -> (H, W) int64 label map, labels 0..N-1.

    ``image`` is (H, W) or (H, W, C) uint8 in any colour space (pixel differences are
    Euclidean over the channels, as in the authors' code). ``k`` is the scale threshold in
    0..255 units; ``min_size`` defaults to k, as in the authors' code.
    """
    return segment_smoothed(smooth_for_segmentation(image, sigma), k, min_size=min_size)


def smooth_for_segmentation(image: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """(H, W[, C]) uint8 -> (H, W, C) float64 in [0, 1], Gaussian-smoothed per channel.

    Felzenszwalb's method smooths before building its graph; doing it here, once per colour
    space, lets every threshold k reuse it. Reflect border, as skimage and the reference code.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise SelectiveSearchError(f"segmentation needs an (H, W[, C]) image, got shape {image.shape}")
    scaled: np.ndarray = image.astype(np.float64) * (1.0 / 255.0)
    if sigma > 0:
        scaled = cv2.GaussianBlur(scaled, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)
    return scaled.reshape(image.shape)  # GaussianBlur drops a trailing channel axis of 1


def segment_smoothed(smoothed: np.ndarray, k: float, min_size: Optional[int] = None) -> np.ndarray:
    """Felzenszwalb-Huttenlocher on an image from ``smooth_for_segmentation``
    -> (H, W) int64 labels 0..N-1. ``min_size`` defaults to k.

    To segment one image at several k, build its ``pixel_graph`` once and call
    ``segment_graph`` per k: the graph is most of the work.
    """
    return segment_graph(pixel_graph(smoothed), k, min_size=min_size)


@dataclass
class PixelGraph:
    """The 8-connected pixel grid of one smoothed image as Felzenszwalb's method sees it
    (IJCV 2004, Sec. 5: grid graph, weight = Euclidean colour distance of the two pixels),
    edges sorted by ascending weight.

    first, second (E,) raster indices (y * W + x) of each edge's pixels; weights (E,) float64.
    E = 4HW - 3H - 3W + 2: right, down, down-right and up-right neighbours.

    It depends only on the image (and sigma), not on k, so every threshold of a colour space
    shares one graph; only the merge loop (``segment_graph``) runs per k.
    """

    height: int
    width: int
    first: np.ndarray
    second: np.ndarray
    weights: np.ndarray


def pixel_graph(smoothed: np.ndarray) -> PixelGraph:
    """(H, W, C) float64 image (``smooth_for_segmentation``) -> its sorted ``PixelGraph``.

    The weights are computed with the same numpy expressions, in the same edge order, and
    sorted with the same ``np.argsort`` as scikit-image's ``felzenszwalb``, so equal weights
    (frequent: flat areas, 8-bit input) come out in the same order and the segmentation is
    identical to scikit-image's.
    """
    image = np.asarray(smoothed, np.float64)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise SelectiveSearchError(f"segmentation needs an (H, W[, C]) image, got shape {image.shape}")
    h, w = image.shape[:2]
    index = np.arange(h * w, dtype=np.int32 if h * w < 2**31 else np.int64).reshape(h, w)
    # (pixel, neighbour) pairs of the four edge directions, as slices of the grid
    directions = [
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),  # right
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),  # down
        ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),  # down-right
        ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),  # up-right
    ]
    weights, first, second = [], [], []
    for near, far in directions:
        diff = image[near] - image[far]
        weights.append(np.sqrt(np.sum(diff * diff, axis=-1)).ravel())
        first.append(index[near].ravel())
        second.append(index[far].ravel())
    all_weights = np.concatenate(weights)
    order = np.argsort(all_weights)  # the default kind, as scikit-image: same order of ties
    return PixelGraph(
        height=h,
        width=w,
        first=np.concatenate(first)[order],
        second=np.concatenate(second)[order],
        weights=all_weights[order],
    )


def segment_graph(graph: PixelGraph, k: float, min_size: Optional[int] = None) -> np.ndarray:
    """Felzenszwalb-Huttenlocher at threshold ``k`` (0..255 units, as the reference code)
    on a ``pixel_graph`` -> (H, W) int64 labels 0..N-1 in raster order of first pixel.

    ``min_size`` (pixels) defaults to k, as in the Selective Search authors' code. The same
    label map as ``skimage.segmentation.felzenszwalb(smoothed, scale=k, sigma=0,
    min_size=min_size)``.
    """
    # numba is imported here, not at the top: only a segmentation needs it (see fh_kernel).
    try:
        from detkit.modeling.proposals.selective_search.fh_kernel import felzenszwalb_labels
    except ModuleNotFoundError as exc:
        if exc.name != "numba":
            raise
        raise SelectiveSearchError("Selective Search's segmentation needs numba: pip install numba") from exc

    # weights are in [0, 1] units (the image was scaled by 1/255), so k scales the same way
    labels = felzenszwalb_labels(
        graph.first,
        graph.second,
        graph.weights,
        graph.height * graph.width,
        float(k) / 255.0,
        int(k if min_size is None else min_size),
    )
    return labels.reshape(graph.height, graph.width)


def relabel(label_map: np.ndarray) -> np.ndarray:
    """Any integer label map -> labels 0..N-1 in order of first value (np.unique order)."""
    _, inverse = np.unique(np.asarray(label_map), return_inverse=True)
    return inverse.reshape(np.shape(label_map)).astype(np.int64)


def check_label_map(label_map: np.ndarray) -> np.ndarray:
    """Validate a label map (2-D, integer, labels 0..N-1 all used); return its region
    sizes (N,) int64 (pixels per region), which the check needs anyway."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.size == 0:
        raise SelectiveSearchError(f"label map must be a non-empty (H, W) array, got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise SelectiveSearchError(f"label map must hold integers, got dtype {label_map.dtype}")
    if label_map.min() < 0:
        raise SelectiveSearchError(f"label map has negative label {int(label_map.min())}")
    sizes = region_sizes(label_map, int(label_map.max()) + 1)
    if sizes.min() == 0:
        raise SelectiveSearchError(
            f"label map must use every label in 0..{len(sizes) - 1}; label {int(sizes.argmin())} "
            f"is missing (use relabel() first)"
        )
    return sizes


def region_adjacency(label_map: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Pairs of regions that touch -> (E, 2) int64, each row (i, j) with i < j, rows sorted.

    connectivity 4: regions sharing a pixel edge; 8: also regions touching at a corner.
    """
    if connectivity not in (4, 8):
        raise SelectiveSearchError(f"connectivity must be 4 or 8, got {connectivity!r}")
    lab = np.asarray(label_map)
    n = int(lab.max()) + 1
    shifts = [(lab[:, :-1], lab[:, 1:]), (lab[:-1, :], lab[1:, :])]
    if connectivity == 8:
        shifts += [(lab[:-1, :-1], lab[1:, 1:]), (lab[:-1, 1:], lab[1:, :-1])]
    parts = []
    for a, b in shifts:
        differ = a != b
        a, b = a[differ], b[differ]
        # One int64 key per unordered pair makes np.unique do the de-duplication.
        parts.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    keys = np.unique(np.concatenate(parts))
    return np.stack([keys // n, keys % n], axis=1)


def region_sizes(label_map: np.ndarray, num_regions: int) -> np.ndarray:
    """Pixels per region -> (N,) int64."""
    return np.bincount(np.asarray(label_map).ravel(), minlength=num_regions).astype(np.int64)


def region_boxes(label_map: np.ndarray, num_regions: int) -> np.ndarray:
    """Tight box of every region -> (N, 4) int64 xyxy with exclusive x2, y2."""
    lab = np.asarray(label_map)
    h, w = lab.shape
    # Which columns / rows each region occupies: (N, W) and (N, H) boolean tables, small
    # next to the image, and two argmaxes give first and last occupied index.
    cols = np.zeros((num_regions, w), bool)
    cols[lab, np.arange(w)[None, :]] = True
    rows = np.zeros((num_regions, h), bool)
    rows[lab, np.arange(h)[:, None]] = True
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)

"""The sequential core of Felzenszwalb-Huttenlocher segmentation, compiled with numba.

Felzenszwalb & Huttenlocher, "Efficient Graph-Based Image Segmentation", IJCV 2004: Sec. 4,
Algorithm 1 walks the edges in ascending weight and joins the two components of an edge when
its weight w is below both components' MInt = Int(C) + tau(C) (Eq. 4), tau(C) = k / |C|
(Eq. 5), Int(C) being the largest edge of C's minimum spanning tree (Eq. 1) -- which, as the
edges come sorted, is simply the edge that made the last join. The authors' code then joins
every remaining edge whose component is smaller than ``min_size`` pixels.

Each edge depends on the components the earlier edges left, so this loop cannot be written
as numpy array operations; in the interpreter it would take seconds per image. numba compiles
it to machine code on first use (cached on disk afterwards, ``cache=True``). This module is
imported only when a segmentation runs, so ``import detkit`` does not pay numba's import.

Shapes: P pixels, E edges. Pixels are raster indices y * W + x.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _find(parent, p):
    """Root of p's component, halving the path on the way (every node skips to its grandparent)."""
    while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@njit(cache=True, nogil=True)
def _join(parent, size, a, b):
    """Join the components with roots a != b (the smaller under the larger); return the new root."""
    if size[a] < size[b]:
        a, b = b, a
    parent[b] = a
    size[a] += size[b]
    return a


@njit(cache=True, nogil=True)
def felzenszwalb_labels(first, second, weights, num_pixels, scale, min_size):
    """Segment a graph whose edges (first[e], second[e]) come sorted by ascending weights[e].

    first, second (E,) integer pixel indices; weights (E,) float64; ``scale`` is k in the
    units of the weights. Returns (P,) int64 labels 0..N-1, numbered in the raster order of
    each component's first pixel.

    The merge test rounds MInt to float32 before comparing, as scikit-image's implementation
    does (its thresholds are C floats); this keeps the label maps identical to
    ``skimage.segmentation.felzenszwalb`` on the same input.
    """
    parent = np.arange(num_pixels)
    size = np.ones(num_pixels, np.int64)
    internal = np.zeros(num_pixels)  # Int(C) at each root: the weight of its last join
    # Edges that joined nothing, in sorted order. The others lie inside one component from
    # their turn on (components only grow), so the post-processing need not look at them.
    rejected = np.empty(len(weights), np.int64)
    num_rejected = 0

    for e in range(len(weights)):
        a = _find(parent, first[e])
        b = _find(parent, second[e])
        if a == b:
            continue
        m_int = min(np.float32(internal[a] + scale / size[a]), np.float32(internal[b] + scale / size[b]))
        if weights[e] < m_int:
            internal[_join(parent, size, a, b)] = weights[e]
        else:
            rejected[num_rejected] = e
            num_rejected += 1

    # Post-processing of the authors' code: a component below min_size joins its neighbour
    # across the lightest edge, i.e. the first edge in the sorted order that leaves it.
    for e in rejected[:num_rejected]:
        a = _find(parent, first[e])
        b = _find(parent, second[e])
        if a != b and (size[a] < min_size or size[b] < min_size):
            _join(parent, size, a, b)

    label_of_root = np.full(num_pixels, -1, np.int64)
    labels = np.empty(num_pixels, np.int64)
    count = 0
    for p in range(num_pixels):
        root = _find(parent, p)
        if label_of_root[root] < 0:
            label_of_root[root] = count
            count += 1
        labels[p] = label_of_root[root]
    return labels

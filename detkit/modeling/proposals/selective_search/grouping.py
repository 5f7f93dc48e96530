"""Hierarchical grouping of Selective Search (Uijlings et al., IJCV 2013, Sec. 3.1, Alg. 1):
starting from an over-segmentation, repeatedly merge the two most similar adjacent regions
until one region is left; every region of the hierarchy is a proposal box.

Similarities (Sec. 3.2): colour (histogram intersection of 25-bin colour histograms per
channel), texture (SIFT-like 8-orientation x 10-bin Gaussian-derivative histograms), size
(small regions merge early) and fill (regions that fit into each other merge early). A
strategy combines a subset of them (``parse_similarity``).

Shapes: N initial regions of one segmentation, H x W image.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from detkit.errors import SelectiveSearchError
from detkit.modeling.proposals.selective_search.features import (
    colour_histograms,
    fill_similarity,
    histogram_intersection,
    size_similarity,
    texture_histograms,
)
from detkit.modeling.proposals.selective_search.segmentation import (
    check_label_map,
    region_adjacency,
    region_boxes,
)

SIMILARITIES = ("colour", "texture", "size", "fill")
_LETTERS = {"C": "colour", "T": "texture", "S": "size", "F": "fill"}

CTSF = ("colour", "texture", "size", "fill")
TSF = ("texture", "size", "fill")
FILL = ("fill",)
SIZE = ("size",)


def parse_similarity(similarity: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """("colour", "fill") or "C+F" / "CF" -> canonical tuple in C, T, S, F order."""
    if isinstance(similarity, str):
        letters = similarity.replace("+", "").upper()
        bad = [ch for ch in letters if ch not in _LETTERS]
        if bad or not letters:
            raise SelectiveSearchError(f"unknown similarity {similarity!r}; use letters C, T, S, F (e.g. 'C+T+S+F')")
        names = {_LETTERS[ch] for ch in letters}
    else:
        names = set(similarity)
        bad = sorted(names - set(SIMILARITIES))
        if bad or not names:
            raise SelectiveSearchError(
                f"unknown similarity {bad or similarity!r}; expected a non-empty subset of {SIMILARITIES}"
            )
    return tuple(name for name in SIMILARITIES if name in names)


# --- hierarchical grouping ------------------------------------------------------------


@dataclass
class Regions:
    """The initial regions of one segmentation, with everything the similarities need.

    sizes (N,) pixels; boxes (N, 4) int64 xyxy; pairs (E, 2) adjacent regions i < j;
    colour (N, C*25) and texture (N, C*80) L1-normalised histograms, None when unused.
    """

    sizes: np.ndarray
    boxes: np.ndarray
    pairs: np.ndarray
    image_size: int
    colour: Optional[np.ndarray] = None
    texture: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.sizes)


@dataclass
class Hierarchy:
    """Result of grouping N initial regions: region t >= N was made by merging merges[t-N].

    boxes (N + M, 4) int64 xyxy: the N initial regions, then the M merged ones in merge
    order (the last is the whole image when the regions form one connected graph, M = N-1);
    merges (M, 2) the two regions merged; similarities (M,) the similarity of each merge.
    """

    boxes: np.ndarray
    merges: np.ndarray
    similarities: np.ndarray
    num_initial: int

    @property
    def merged_boxes(self) -> np.ndarray:
        return self.boxes[self.num_initial :]


def region_features(
    label_map: np.ndarray,
    image: Optional[np.ndarray] = None,
    *,
    colour: bool = True,
    texture: bool = True,
    connectivity: int = 4,
    colour_index: Optional[np.ndarray] = None,
    texture_index: Optional[np.ndarray] = None,
) -> Regions:
    """Describe the regions of ``label_map`` (labels 0..N-1) for grouping.

    ``image`` is (H, W, C) uint8 in the strategy's colour space; it is needed only for the
    colour/texture histograms (pass precomputed ``*_index`` to reuse pixel bins).
    """
    sizes = check_label_map(label_map)
    n = len(sizes)
    if (colour or texture) and image is None:
        raise SelectiveSearchError("region_features needs the image for colour/texture histograms")
    if image is not None and np.shape(image)[:2] != np.shape(label_map):
        raise SelectiveSearchError(
            f"image shape {np.shape(image)[:2]} does not match label map shape {np.shape(label_map)}"
        )
    return Regions(
        sizes=sizes,
        boxes=region_boxes(label_map, n),
        pairs=region_adjacency(label_map, connectivity),
        image_size=int(np.size(label_map)),
        colour=colour_histograms(label_map, n, image, colour_index) if colour else None,
        texture=texture_histograms(label_map, n, image, texture_index) if texture else None,
    )


def group_regions(regions: Regions, similarity: Union[str, Sequence[str]] = CTSF) -> Hierarchy:
    """Greedy hierarchical grouping (paper Alg. 1) of adjacent regions.

    Similarities live in a max-heap with lazy invalidation: a merge only marks its two
    regions dead, and stale pairs are skipped when popped. Ties pop in (i, j) order, which
    keeps the result deterministic.
    """
    use = set(parse_similarity(similarity))
    if "colour" in use and regions.colour is None or "texture" in use and regions.texture is None:
        raise SelectiveSearchError(f"similarity {sorted(use)} needs histograms that were not computed")
    n = len(regions)
    total = 2 * n - 1
    image_size = float(regions.image_size)

    sizes = np.zeros(total, np.float64)
    sizes[:n] = regions.sizes
    boxes = np.zeros((total, 4), np.int64)
    boxes[:n] = regions.boxes
    # s_colour + s_texture is one intersection of the concatenated histograms, so one table
    # (and one np.minimum per merge) serves both.
    parts = [getattr(regions, name) for name in ("colour", "texture") if name in use]
    hist = None
    if parts:
        hist = np.zeros((total, sum(p.shape[1] for p in parts)), np.float64)
        hist[:n] = np.concatenate(parts, axis=1)
    use_size, use_fill = "size" in use, "fill" in use

    def similarities(t, js):
        """Similarity of region t (an index or an array like js) with regions js."""
        s = histogram_intersection(hist[t], hist[js]) if hist is not None else 0.0
        if use_size and use_fill:
            # size + fill = 2 - size(BB_tj) / size_im: the region sizes cancel.
            extent = np.maximum(boxes[t, ..., 2:], boxes[js, 2:]) - np.minimum(boxes[t, ..., :2], boxes[js, :2])
            s = s + (2.0 - extent.prod(axis=-1) * (1.0 / image_size))
        elif use_size:
            s = s + size_similarity(sizes[t], sizes[js], image_size)
        elif use_fill:
            s = s + fill_similarity(boxes[t], boxes[js], sizes[t], sizes[js], image_size)
        return s

    first, second = regions.pairs[:, 0], regions.pairs[:, 1]
    heap = list(zip((-similarities(first, second)).tolist(), first.tolist(), second.tolist()))
    heapq.heapify(heap)
    neighbours: List[Optional[set]] = [set() for _ in range(n)] + [None] * (n - 1)
    for i, j in regions.pairs.tolist():
        neighbours[i].add(j)
        neighbours[j].add(i)
    alive = [True] * n + [False] * (n - 1)
    pop, push = heapq.heappop, heapq.heappush
    # Python copies of sizes and boxes: scalar work per merge is cheaper on lists than on
    # numpy rows; the arrays serve the vectorised similarities.
    size_list = regions.sizes.astype(np.float64).tolist()
    box_list = [tuple(b) for b in regions.boxes.tolist()]

    merges, merge_sims = [], []
    for t in range(n, total):
        while heap:
            neg_sim, i, j = pop(heap)
            if alive[i] and alive[j]:
                break
        else:
            break  # no adjacent pair left: the region graph was not connected
        size_i, size_j = size_list[i], size_list[j]
        size_t = size_i + size_j
        size_list.append(size_t)
        sizes[t] = size_t
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = box_list[i], box_list[j]
        box_t = (min(ax1, bx1), min(ay1, by1), max(ax2, bx2), max(ay2, by2))
        box_list.append(box_t)
        boxes[t] = box_t
        if hist is not None:  # a merged histogram is the size-weighted mean (stays L1 = 1)
            np.add(hist[i] * (size_i / size_t), hist[j] * (size_j / size_t), out=hist[t])
        alive[i] = alive[j] = False
        alive[t] = True
        merges.append((i, j))
        merge_sims.append(-neg_sim)

        touching = neighbours[i] | neighbours[j]
        touching.discard(i)
        touching.discard(j)
        neighbours[i] = neighbours[j] = None
        neighbours[t] = touching
        for m in touching:
            other = neighbours[m]
            other.discard(i)
            other.discard(j)
            other.add(t)
        if touching:
            js = np.fromiter(touching, np.int64, len(touching))
            for m, s in zip(js.tolist(), similarities(t, js).tolist()):
                push(heap, (-s, m, t))  # m < t always: t is the newest region

    num_merged = len(merges)
    return Hierarchy(
        boxes=boxes[: n + num_merged],
        merges=np.asarray(merges, np.int64).reshape(-1, 2),
        similarities=np.asarray(merge_sims, np.float64),
        num_initial=n,
    )


def hierarchical_grouping(
    label_map: np.ndarray,
    image: Optional[np.ndarray] = None,
    similarity: Union[str, Sequence[str]] = CTSF,
    connectivity: int = 4,
) -> Hierarchy:
    """Group the regions of ``label_map`` (labels 0..N-1) of ``image`` (H, W, C) uint8 in the
    strategy's colour space; ``image`` may be None for size/fill-only similarities."""
    use = parse_similarity(similarity)
    regions = region_features(
        label_map, image, colour="colour" in use, texture="texture" in use, connectivity=connectivity
    )
    return group_regions(regions, use)

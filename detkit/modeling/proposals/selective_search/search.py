"""Selective Search object proposals (Uijlings et al., "Selective Search for Object
Recognition", IJCV 2013), the proposal source of R-CNN, SPP-net and Fast R-CNN.

One *strategy* = (colour space, Felzenszwalb threshold k, similarity combination):

1. over-segment the image in that colour space (``segmentation.initial_regions``);
2. hierarchical grouping (paper Alg. 1): repeatedly merge the two most similar *adjacent*
   regions until one region remains; every region of the hierarchy yields a box;
3. diversification: run several strategies and pool their boxes;
4. ranking (paper Sec. 3.3, "Combining Locations"): within one hierarchy a region's
   position is its merge order (the whole image = 1); positions are multiplied by a random
   number in [0, 1] so that strategies interleave, sorted ascending, duplicates dropped
   (best rank kept).

Modes (paper Sec. 5.1, the "Single Strategy", "Selective Search Fast" and "Selective Search
Quality" combinations; the same sets as the authors' demo code: colorTypes, ks and
simFunctionHandles, of which ``fastMode`` keeps the first two of each):
    single  : HSV, k=100, C+T+S+F                                        (1 strategy)
    fast    : {HSV, Lab} x k {50, 100} x {C+T+S+F, T+S+F}                (8 strategies)
    quality : {HSV, Lab, rgI, H, I} x k {50, 100, 150, 300}
              x {C+T+S+F, T+S+F, F, S}                                   (80 strategies)

Shapes: H x W image, N initial regions of one segmentation, R proposal boxes.
Boxes are float32 xyxy in input-image pixels with exclusive ends (``detkit.structures``).

The per-colour-space work (conversion, the segmentation's sorted pixel graph, texture
derivatives, pixel bin indices) and the per-segmentation work (label map, adjacency,
histograms) are computed once and shared by every strategy that needs them; only the greedy
merge loop runs per strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from detkit.errors import SelectiveSearchError
from detkit.modeling.proposals.selective_search.features import colour_bin_index, texture_bin_index
from detkit.modeling.proposals.selective_search.grouping import (
    CTSF,
    FILL,
    SIZE,
    TSF,
    group_regions,
    parse_similarity,
    region_features,
)
from detkit.modeling.proposals.selective_search.segmentation import (
    canonical_colour_space,
    convert_colour,
    pixel_graph,
    segment_graph,
    smooth_for_segmentation,
)

MODES = ("single", "fast", "quality")


@dataclass(frozen=True)
class Strategy:
    """One diversification strategy: colour space, threshold k (min_size = k), similarity."""

    colour_space: str
    k: int
    similarity: Tuple[str, ...]

    def __post_init__(self):
        # Normalise ("hsv", "C+T+S+F") to ("HSV", ("colour", ...)) so equal strategies compare
        # and hash equal; bad names fail here with the list of valid ones.
        object.__setattr__(self, "colour_space", canonical_colour_space(self.colour_space))
        object.__setattr__(self, "similarity", parse_similarity(self.similarity))
        if not self.k > 0:
            raise SelectiveSearchError(f"Strategy threshold k must be > 0, got {self.k!r}")

    def __str__(self) -> str:
        letters = "+".join(name[0].upper() for name in self.similarity)
        return f"{self.colour_space}/k={self.k}/{letters}"


def strategies_for_mode(mode: str) -> List[Strategy]:
    """The paper's strategy sets (module docstring), ordered like the authors' demo loops
    (k outside, colour space inside)."""
    if mode == "single":
        return [Strategy("HSV", 100, CTSF)]
    spaces: Tuple[str, ...]
    ks: Tuple[int, ...]
    sims: Tuple[Tuple[str, ...], ...]
    if mode == "fast":
        spaces, ks, sims = ("HSV", "Lab"), (50, 100), (CTSF, TSF)
    elif mode == "quality":
        spaces, ks, sims = ("HSV", "Lab", "rgI", "H", "I"), (50, 100, 150, 300), (CTSF, TSF, FILL, SIZE)
    else:
        raise SelectiveSearchError(f"unknown selective search mode {mode!r}; expected one of {MODES}")
    return [Strategy(space, k, sim) for k in ks for space in spaces for sim in sims]


# --- ranking ---------------------------------------------------------------------------


def rank_boxes(
    boxes: np.ndarray,
    priorities: np.ndarray,
    seed: Optional[int] = 0,
    min_size: float = 0,
    max_boxes: Optional[int] = None,
):
    """Pseudo-random ranking (paper Sec. 3.3) of pooled boxes.

    boxes (R, 4) xyxy and priorities (R,) (1 = best position inside its hierarchy).
    Each priority is multiplied by a uniform random number from ``seed``; the boxes are
    sorted ascending, then boxes with width or height < ``min_size`` are dropped, then
    exact duplicates (best rank kept), then all but the first ``max_boxes``.
    Returns (boxes (R', 4) in rank order, values (R',) the randomised priorities).
    """
    boxes = np.asarray(boxes)
    values = np.asarray(priorities, np.float64) * np.random.default_rng(seed).random(len(boxes))
    order = np.argsort(values, kind="stable")
    boxes, values = boxes[order], values[order]
    if min_size > 0:
        keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
        boxes, values = boxes[keep], values[keep]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        first.sort()  # np.unique gives the first occurrence = the best-ranked copy
        boxes, values = boxes[first], values[first]
    if max_boxes is not None:
        boxes, values = boxes[:max_boxes], values[:max_boxes]
    return boxes, values


# --- the public entry point ------------------------------------------------------------


def selective_search(
    image: np.ndarray,
    mode: Union[str, Sequence[Strategy]] = "fast",
    min_size: float = 20,
    max_boxes: Optional[int] = None,
    seed: Optional[int] = 0,
    scale: Optional[float] = None,
    sigma: float = 0.8,
    connectivity: int = 4,
) -> Tuple[np.ndarray, np.ndarray]:
    """Selective Search proposals of one image.

    Args:
        image: (H, W, 3) uint8 RGB (an (H, W) grey image is accepted too).
        mode: "single", "fast" or "quality" (see the module docstring), or a list of
            ``Strategy``.
        min_size: drop boxes narrower or lower than this many input pixels (the authors'
            code uses 20).
        max_boxes: keep only the best-ranked boxes; None keeps all.
        seed: seed of the ranking's random numbers (same seed -> same order).
        scale: resize the image by this factor before segmenting (e.g. 0.5 to trade
            recall for speed); boxes are mapped back to input pixels. None = native size.
        sigma: Gaussian smoothing of the segmentation (paper: 0.8).
        connectivity: 4 or 8, which pixels make two regions adjacent.

    Returns:
        boxes (R, 4) float32 xyxy in input pixels, best first, and scores (R,) float32,
        higher = better rank (1 / (1 + randomised position)).
    """
    image = _check_image(image)
    if max_boxes is not None and max_boxes < 0:
        raise SelectiveSearchError(f"max_boxes must be None or >= 0, got {max_boxes!r}")
    strategies = strategies_for_mode(mode) if isinstance(mode, str) else list(mode)
    if not strategies:
        raise SelectiveSearchError("selective_search needs at least one strategy")
    height, width = image.shape[:2]
    work = image
    if scale is not None and scale != 1:
        if not scale > 0:
            raise SelectiveSearchError(f"scale must be > 0, got {scale!r}")
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        work = cv2.resize(image, size, interpolation=interpolation)

    # Group strategies by segmentation so each (colour space, k) is segmented and described
    # once, and segmentations by colour space so each space is converted, smoothed, turned
    # into a sorted pixel graph and binned once for all its thresholds k.
    by_segmentation: Dict[Tuple[str, int], List[Tuple[str, ...]]] = {}
    for strategy in strategies:
        if not isinstance(strategy, Strategy):
            raise SelectiveSearchError(f"mode must be a mode name or a list of Strategy, got an item {strategy!r}")
        sims = by_segmentation.setdefault((strategy.colour_space, strategy.k), [])
        if strategy.similarity not in sims:
            sims.append(strategy.similarity)
    spaces = list(dict.fromkeys(space for space, _ in by_segmentation))

    # One colour space at a time, so only one pixel graph (16 bytes per edge) is held.
    found: Dict[Tuple[str, int], List[Tuple[np.ndarray, np.ndarray]]] = {}
    for space in spaces:
        cs_image = convert_colour(work, space)
        graph = pixel_graph(smooth_for_segmentation(cs_image, sigma))
        segmentations = [(k, sims) for (s, k), sims in by_segmentation.items() if s == space]
        need_colour = any("colour" in sim for _, sims in segmentations for sim in sims)
        need_texture = any("texture" in sim for _, sims in segmentations for sim in sims)
        colour_index = colour_bin_index(cs_image) if need_colour else None
        texture_index = texture_bin_index(cs_image) if need_texture else None
        for k, sims in segmentations:
            labels = segment_graph(graph, k=k, min_size=k)
            regions = region_features(
                labels,
                cs_image,
                colour=any("colour" in sim for sim in sims),
                texture=any("texture" in sim for sim in sims),
                connectivity=connectivity,
                colour_index=colour_index,
                texture_index=texture_index,
            )
            n = len(regions)
            # As in the authors' code, the initial regions enter once per segmentation, ranked
            # just behind the first merge (position N); merged regions of each similarity get
            # positions M..1, the last merge (the whole image) being 1.
            found[space, k] = [(regions.boxes, np.full(n, float(n)))]
            for sim in sims:
                merged = group_regions(regions, sim).merged_boxes
                found[space, k].append((merged, np.arange(len(merged), 0, -1, dtype=np.float64)))

    # Pool in strategy order: the ranking draws one random number per box in pool order.
    pooled = [part for key in by_segmentation for part in found[key]]
    all_boxes = [part_boxes for part_boxes, _ in pooled]
    all_priorities = [priorities for _, priorities in pooled]
    boxes = np.concatenate(all_boxes).astype(np.float64)
    if work is not image:  # back to input pixels before the min-size filter
        sx, sy = width / work.shape[1], height / work.shape[0]
        boxes = boxes * np.array([sx, sy, sx, sy])
        boxes = np.clip(np.rint(boxes), 0, [width, height, width, height])
    boxes, values = rank_boxes(boxes, np.concatenate(all_priorities), seed=seed, min_size=min_size, max_boxes=max_boxes)
    return boxes.astype(np.float32), (1.0 / (1.0 + values)).astype(np.float32)


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise SelectiveSearchError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise SelectiveSearchError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise SelectiveSearchError(f"image must be uint8, got dtype {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise SelectiveSearchError(f"image too small for selective search: shape {image.shape}")
    return np.ascontiguousarray(image)


# --- the ProposalGenerator ---------------------------------------------------------------


class SelectiveSearchProposals(torch.nn.Module):
    """ProposalGenerator running ``selective_search`` on every image of the batch:
    ``forward(images, features, targets=None) -> (proposals, {})``.

    Each image is taken from ``images.tensor[i, :, :h, :w]`` ((h, w) = image_sizes[i], the
    padding left out), un-normalised with ``pixel_mean`` / ``pixel_std`` (they must be the
    data pipeline's ``Normalize`` values) and rounded to uint8 RGB; proposals are therefore
    in network-input pixels; ``min_size`` is in original-image pixels (scaled to the input),
    as in ``detkit proposals`` files. Scores encode the rank (high = better).

    This is slow (about a second per VOC-sized image in "fast" mode, far more at the network
    input size or in "quality" mode) and runs on the CPU at every forward, also at every
    training epoch. The papers that used Selective Search (R-CNN, SPP-net, Fast R-CNN)
    computed proposals once per dataset: write them with ``detkit proposals ... --out
    FILE.npz`` (parallel, resumable) and use ``PrecomputedProposals(FILE.npz)``. This module
    serves demos, single images and checks.
    """

    def __init__(
        self,
        mode: str = "fast",
        max_proposals: int = 2000,
        min_size: float = 20,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: Optional[int] = 0,
    ):
        super().__init__()
        strategies_for_mode(mode)  # fails early on a bad mode name
        if max_proposals < 1:
            raise SelectiveSearchError(f"max_proposals must be >= 1, got {max_proposals!r}")
        self.mode = mode
        self.max_proposals = int(max_proposals)
        self.min_size = float(min_size)
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        self.pixel_std = tuple(float(s) for s in pixel_std)
        self.seed = seed

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, max_proposals={self.max_proposals}, min_size={self.min_size}"

    def image_array(self, image: "torch.Tensor") -> np.ndarray:
        """(3, h, w) normalised tensor -> (h, w, 3) uint8 RGB, as ``selective_search`` wants."""
        from detkit.data.transforms import unnormalize

        rgb = unnormalize(image.detach().float().cpu(), self.pixel_mean, self.pixel_std)
        return rgb.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()

    @torch.no_grad()
    def forward(self, images, features=None, targets=None):
        from detkit.structures import Proposals

        out = []
        device = images.tensor.device
        for i, (h, w) in enumerate(images.image_sizes):
            array = self.image_array(images.tensor[i, :, :h, :w])
            # min_size is in original pixels, as for `detkit proposals` files: scale it to
            # the network input so both paths keep the same boxes.
            scale = min(images.geometry(i).scale)
            boxes, scores = selective_search(
                array, self.mode, min_size=self.min_size * scale, max_boxes=self.max_proposals, seed=self.seed
            )
            out.append(Proposals(torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device)))
        return out, {}

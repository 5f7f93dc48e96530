"""Box statistics of a dataset in the pixels the network sees, and how well anchors fit them
(``detkit data check --plots``).

Shape shorthand: N images, B boxes (all images), A anchor shapes.

Anchors live in network-input pixels (after the test-time resize), so box sizes are
compared there: each record's boxes are scaled by the factor ``resize_scale`` gives its
image (shorter side to ``min_size_test``, longer side at most ``max_size``), as the
detector's own transform does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from detkit.data.transforms import resize_scale


@dataclass
class BoxStats:
    """labels (B,) in 1..K; boxes_per_image (N,); width, height (B,) in ``units`` pixels
    (difficult boxes included: they are in the images too)."""

    labels: np.ndarray
    boxes_per_image: np.ndarray
    width: np.ndarray
    height: np.ndarray
    units: str

    @property
    def sizes(self) -> np.ndarray:
        """sqrt(w h): the side of the square of the same area (what anchor sizes mean)."""
        return np.sqrt(self.width * self.height)

    @property
    def ratios(self) -> np.ndarray:
        """h / w, the anchors' aspect-ratio convention."""
        return self.height / np.maximum(self.width, 1e-9)


def box_stats(records, min_size: Optional[float] = None, max_size: Optional[float] = None) -> BoxStats:
    """Statistics of ``records``' boxes; with ``min_size``/``max_size`` (the config's
    ``data.input.min_size_test`` / ``max_size``) in network-input pixels, else original pixels."""
    labels, widths, heights, per_image = [], [], [], []
    for r in records:
        b = r.boxes.reshape(-1, 4).astype(np.float64)
        s = (
            resize_scale(r.height, r.width, min_size, max_size or float("inf"))
            if min_size and r.width and r.height
            else 1.0
        )
        widths.append((b[:, 2] - b[:, 0]) * s)
        heights.append((b[:, 3] - b[:, 1]) * s)
        labels.append(r.labels)
        per_image.append(len(b))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return BoxStats(
        cat(labels, np.int64),
        np.asarray(per_image, np.int64),
        cat(widths, np.float64),
        cat(heights, np.float64),
        "network-input pixels" if min_size else "original pixels",
    )


def anchor_shapes(sizes: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]]) -> np.ndarray:
    """(A, 2) distinct (w, h) of the anchors of every level (``model.anchors`` sizes and
    aspect_ratios; one ratio list is shared by every level), as ``modeling/proposals/anchors``
    builds them: w = s / sqrt(r), h = s sqrt(r)."""
    sizes = [list(s) for s in sizes]
    ratios = [list(r) for r in ratios]
    if len(ratios) == 1:
        ratios = ratios * len(sizes)
    if len(sizes) == 1:
        sizes = sizes * len(ratios)
    shapes = {
        (float(s) / np.sqrt(float(r)), float(s) * np.sqrt(float(r)))
        for level_s, level_r in zip(sizes, ratios)
        for s in level_s
        for r in level_r
    }
    return np.array(sorted(shapes), np.float64).reshape(-1, 2)


def best_anchor_iou(width: np.ndarray, height: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """(B,) the best IoU of each box with an anchor shape, both centred on the same point:
    an upper bound on what the RPN's matcher can see (the anchor grid's stride only lowers
    it), so a box below ~0.5 can hardly become an RPN positive (0.7 in the paper, sec. 3.1.2;
    only the best-anchor rule saves it)."""
    if len(width) == 0 or len(shapes) == 0:
        return np.zeros(len(width))
    w, h = width[:, None], height[:, None]
    aw, ah = shapes[None, :, 0], shapes[None, :, 1]
    inter = np.minimum(w, aw) * np.minimum(h, ah)
    iou = inter / (w * h + aw * ah - inter)
    return iou.max(axis=1)

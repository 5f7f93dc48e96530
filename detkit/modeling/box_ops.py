"""Box primitives passed into the detection modules: the box coder, the matcher and the
balanced sampler. The same Matcher serves the RPN (neg < 0.3, pos >= 0.7), Fast R-CNN
(bg in [0.1, 0.5), fg >= 0.5) and the R-CNN SVMs; only the thresholds differ.

Shapes: R boxes (proposals or anchors), G ground-truth boxes.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

# Largest log-scale a predicted width/height delta may take: exp(4.135) ~ 62.5 = 1000/16,
# i.e. a box may not grow beyond 1000 px from a 16 px anchor. Without the clamp an untrained
# head can predict exp(50) and overflow to inf (torchvision and detectron2 use the same bound).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes a target box relative to a reference box as (dx, dy, dw, dh) (R-CNN paper,
    appendix C) and decodes it back. ``weights`` multiply the deltas: (10, 10, 5, 5) for the
    Fast R-CNN head is the same as the paper's normalisation of targets by std (0.1, 0.1,
    0.2, 0.2); (1, 1, 1, 1) for the RPN.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """targets, references: (R, 4) xyxy -> (R, 4) deltas."""
        wx, wy, ww, wh = self.weights
        rw = references[:, 2] - references[:, 0]
        rh = references[:, 3] - references[:, 1]
        rx = references[:, 0] + 0.5 * rw
        ry = references[:, 1] + 0.5 * rh
        tw = targets[:, 2] - targets[:, 0]
        th = targets[:, 3] - targets[:, 1]
        tx = targets[:, 0] + 0.5 * tw
        ty = targets[:, 1] + 0.5 * th
        return torch.stack(
            [wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)], dim=1
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """deltas: (R, 4*M) for M boxes per reference (class-specific regression);
        references: (R, 4) -> (R, 4*M) boxes xyxy."""
        references = references.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        w = references[:, 2] - references[:, 0]
        h = references[:, 3] - references[:, 1]
        cx = references[:, 0] + 0.5 * w
        cy = references[:, 1] + 0.5 * h
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pcx = dx * w[:, None] + cx[:, None]
        pcy = dy * h[:, None] + cy[:, None]
        half_w = 0.5 * torch.exp(dw) * w[:, None]
        half_h = 0.5 * torch.exp(dh) * h[:, None]
        boxes = torch.stack([pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h], dim=2)
        return boxes.reshape(deltas.shape[0], -1)


def at_most(k: int, x: Tensor, dim: int):
    """min(k, x.shape[dim]), e.g. a top-k count on a level that may hold fewer entries. An
    int; while tracing for export a 0-dim tensor, so that the exported graph takes the
    minimum for each input size instead of freezing the traced input's."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(x)[dim].clamp(max=k)
    return min(k, x.shape[dim])


def clip_boxes(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Clamp (..., 4) xyxy boxes into an image of ``size`` = (h, w) (ints, or 0-dim tensors
    while tracing for export)."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1).reshape(boxes.shape)


def nonempty(boxes: Tensor, min_size: float) -> Tensor:
    """Mask of boxes whose width and height are both >= ``min_size``."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def smooth_l1(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (Fast R-CNN eq. 3 with the transition at ``beta``; beta=0 is L1)."""
    if beta < 1e-5:
        return (input - target).abs().sum()
    return torch.nn.functional.smooth_l1_loss(input, target, beta=beta, reduction="sum")


class Matcher:
    """Assigns each of R predictions (anchors or proposals) to its best ground-truth box and
    labels the match by IoU interval.

    thresholds [t1, ..., tn] split [0, 1] into n+1 intervals [0, t1), [t1, t2), ..., [tn, 1];
    ``labels`` gives one label per interval: 1 = positive, 0 = negative, -1 = ignore.
    RPN: thresholds (0.3, 0.7), labels (0, -1, 1). Fast R-CNN: (0.1, 0.5), (-1, 0, 1).

    allow_low_quality_matches: also make positive every prediction whose IoU with some GT
    equals that GT's best IoU (Faster R-CNN sec. 3.1.2: "the anchor with the highest IoU
    overlap with a ground-truth box"), so that a GT no anchor reaches 0.7 still gets one.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher needs one label per interval: {len(thresholds) + 1}, got {len(labels)}")
        if any(a > b for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"Matcher thresholds must increase, got {thresholds}")
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher labels must be -1, 0 or 1, got {list(labels)}")
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tuple[Tensor, Tensor]:
        """iou: (G, R) -> (matched gt index (R,) int64, match label (R,) int8).
        With G = 0 every prediction gets gt index 0 and the label of IoU 0."""
        if iou.shape[0] == 0:
            idx = iou.new_zeros((iou.shape[1],), dtype=torch.int64)
            lab = iou.new_full((iou.shape[1],), self._label_of(0.0), dtype=torch.int8)
            return idx, lab
        best_iou, matched = iou.max(dim=0)
        match_labels = matched.new_full(matched.shape, 1, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            in_interval = (best_iou >= low) & (best_iou < high)
            match_labels[in_interval] = label
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            # Ties count: every prediction reaching a GT's best IoU (> 0) becomes positive.
            _, pred_idx = torch.nonzero((iou == best_per_gt) & (best_per_gt > 0), as_tuple=True)
            match_labels[pred_idx] = 1
        return matched, match_labels

    def _label_of(self, value: float) -> int:
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            if low <= value < high:
                return label
        return self.labels[-1]


class BalancedSampler:
    """Samples up to ``batch_size_per_image`` predictions with at most ``positive_fraction``
    positives, filling the rest with negatives (Fast R-CNN sec. 2.3: 25 % foreground;
    Faster R-CNN sec. 3.1.3: 256 anchors, up to 1:1)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """labels: (R,) with 1 positive, 0 negative, -1 ignore -> (positive idx, negative idx)."""
        positive = torch.nonzero(labels == 1).squeeze(1)
        negative = torch.nonzero(labels == 0).squeeze(1)
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        perm_pos = torch.randperm(positive.numel(), device=labels.device)[:num_pos]
        perm_neg = torch.randperm(negative.numel(), device=labels.device)[:num_neg]
        return positive[perm_pos], negative[perm_neg]


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(G, 4), (R, 4) -> (G, R) IoU; (0, R) when there are no GT boxes."""
    if boxes1.numel() == 0 or boxes2.numel() == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    return box_iou(boxes1, boxes2)


def cat_boxes(boxes: List[Tensor]) -> Tensor:
    return torch.cat(boxes, 0) if boxes else torch.zeros((0, 4))

"""Proposal recall, as in Hosang et al. ("What makes for effective detection proposals?",
TPAMI 2016) and the RPN analysis of the Faster R-CNN paper (Ren et al., 2015, sec. 4.1).

Shape shorthand: N images, G ground-truth boxes of one image, R proposals of one image
(sorted best first), C proposal counts, T IoU thresholds.

For every ground-truth box take its best IoU among the top-N proposals of its image; recall
at IoU t is the fraction of ground-truth boxes whose best IoU is >= t; average recall (AR)
is the mean recall over the thresholds (0.5:0.05:0.95 by default). IoU is the plain
continuous one (no VOC "+1"), with boxes in the same pixels on both sides: proposals made
on resized network inputs must be mapped back to original pixels first.
Recall does not look at classes.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

DEFAULT_NUM_PROPOSALS = (100, 300, 1000, 2000)
DEFAULT_IOU_THRESHOLDS = np.arange(0.5, 0.951, 0.05)


def _boxes(b) -> np.ndarray:
    """(R, 4) float64 numpy from an array, a tensor or a ``Proposals``."""
    if hasattr(b, "boxes"):
        b = b.boxes
    if hasattr(b, "detach"):
        b = b.detach().cpu().numpy()
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (R, 4), got {b.shape}")
    return b


def _thresholds(iou_thresholds) -> np.ndarray:
    # np.arange gives 0.7000000000000002 and friends; rounding restores the intended values,
    # so that an IoU of exactly 0.7 counts at threshold 0.7.
    return np.round(np.atleast_1d(np.asarray(iou_thresholds, dtype=np.float64)), 6)


def best_iou_at_counts(gt_boxes: Sequence, proposals: Sequence,
                       counts: Sequence[int]) -> np.ndarray:
    """(total G, C): each ground-truth box's best IoU among its image's top ``counts[c]``
    proposals (all of them when an image has fewer; 0 when it has none)."""
    if len(gt_boxes) != len(proposals):
        raise ValueError(f"{len(gt_boxes)} images of ground truth but {len(proposals)} "
                         "of proposals")
    from torchvision.ops import box_iou  # lazily: `detkit evaluate` should start fast

    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (counts < 1).any():
        raise ValueError(f"proposal counts must be >= 1, got {counts.tolist()}")
    rows = []
    for gt, props in zip(gt_boxes, proposals):
        gt, props = _boxes(gt), _boxes(props)[: counts.max()]
        if len(gt) == 0:
            continue
        if len(props) == 0:
            rows.append(np.zeros((len(gt), len(counts))))
            continue
        iou = box_iou(torch.from_numpy(gt), torch.from_numpy(props)).numpy()
        iou = np.nan_to_num(iou, nan=0.0)  # 0 / 0 for two empty boxes
        # best_so_far[:, r] = best IoU among the top r + 1 proposals
        best_so_far = np.maximum.accumulate(iou, axis=1)
        rows.append(best_so_far[:, np.minimum(counts, len(props)) - 1])
    return np.concatenate(rows) if rows else np.zeros((0, len(counts)))


def proposal_recall(
    gt_boxes: Sequence,
    proposals: Sequence,
    num_proposals: Sequence[int] = DEFAULT_NUM_PROPOSALS,
    iou_thresholds=DEFAULT_IOU_THRESHOLDS,
) -> dict:
    """Recall of the top-N proposals at each IoU threshold, and AR, for each N.

    gt_boxes: per image (G, 4) xyxy (difficult boxes already dropped, see
    ``dataset_gt_boxes``); proposals: per image (R, 4) xyxy sorted by rank (arrays, tensors
    or ``Proposals``). Returns {"num_gt": total G, "recall": {N: {t: recall}},
    "AR": {N: mean recall over t}}; thresholds are rounded to 6 decimals (also as keys).
    Recall is NaN when there is no ground truth at all.
    """
    counts = [int(n) for n in num_proposals]
    thresholds = _thresholds(iou_thresholds)
    best = best_iou_at_counts(gt_boxes, proposals, counts)
    num_gt = best.shape[0]
    recall: Dict[int, Dict[float, float]] = {}
    ar: Dict[int, float] = {}
    for c, n in enumerate(counts):
        if num_gt == 0:
            values = np.full(len(thresholds), np.nan)
        else:
            values = (best[:, c][:, None] >= thresholds[None, :]).mean(axis=0)
        recall[n] = {float(t): float(v) for t, v in zip(thresholds, values)}
        ar[n] = float(values.mean())
    return {"num_gt": int(num_gt), "recall": recall, "AR": ar}


def recall_curve(
    gt_boxes: Sequence,
    proposals: Sequence,
    counts: Sequence[int],
    iou: Union[float, Sequence[float]] = 0.5,
) -> np.ndarray:
    """(C,) recall against the number of proposals, for plotting (Faster R-CNN paper,
    fig. 2). ``iou`` a single threshold gives recall at that IoU; a sequence of thresholds
    gives average recall over them (AR vs. number of proposals)."""
    thresholds = _thresholds(iou)
    best = best_iou_at_counts(gt_boxes, proposals, counts)
    if best.shape[0] == 0:
        return np.full(best.shape[1], np.nan)
    return (best[:, :, None] >= thresholds[None, None, :]).mean(axis=(0, 2))


def dataset_gt_boxes(dataset) -> list:
    """Per record, its (G, 4) ground-truth boxes without the difficult / crowd ones."""
    return [rec.boxes[~rec.difficult] for rec in dataset.records]

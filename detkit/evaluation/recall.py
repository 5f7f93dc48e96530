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

import math
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

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


def best_iou_at_counts(gt_boxes: Sequence, proposals: Sequence, counts: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    """(total G, C): each ground-truth box's best IoU among its image's top ``counts[c]``
    proposals (all of them when an image has fewer; 0 when it has none)."""
    if len(gt_boxes) != len(proposals):
        raise ValueError(f"{len(gt_boxes)} images of ground truth but {len(proposals)} of proposals")
    from torchvision.ops import box_iou  # lazily: `detkit evaluate` should start fast

    ks = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (ks < 1).any():
        raise ValueError(f"proposal counts must be >= 1, got {ks.tolist()}")
    rows = []
    for gt, props in zip(gt_boxes, proposals):
        gt, props = _boxes(gt), _boxes(props)[: ks.max()]
        if len(gt) == 0:
            continue
        if len(props) == 0:
            rows.append(np.zeros((len(gt), len(ks))))
            continue
        iou = box_iou(torch.from_numpy(gt), torch.from_numpy(props)).numpy()
        iou = np.nan_to_num(iou, nan=0.0)  # 0 / 0 for two empty boxes
        # best_so_far[:, r] = best IoU among the top r + 1 proposals
        best_so_far = np.maximum.accumulate(iou, axis=1)
        rows.append(best_so_far[:, np.minimum(ks, len(props)) - 1])
    return np.concatenate(rows) if rows else np.zeros((0, len(ks)))


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


# -- summaries and plots (detkit proposals --eval / --plot) -------------------------------
def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def recall_summary(
    gt: Sequence[np.ndarray], proposals: Sequence[np.ndarray], counts: Sequence[int] = DEFAULT_NUM_PROPOSALS
) -> dict:
    """{"num_gt", "mean_proposals", "recall": {N: {"0.5": r, "0.7": r}}, "AR": {N: ar}}
    (string keys, NaN as None: ready for JSON)."""
    res = proposal_recall(gt, proposals, counts)
    return {
        "num_gt": res["num_gt"],
        "mean_proposals": float(np.mean([len(p) for p in proposals])) if len(proposals) else 0.0,
        "recall": {str(n): {str(t): _nan_to_none(res["recall"][n][t]) for t in (0.5, 0.7)} for n in counts},
        "AR": {str(n): _nan_to_none(res["AR"][n]) for n in counts},
    }


def format_recall(name: str, summary: dict, num_images: int) -> str:
    def f(v):
        return "   n/a" if v is None else f"{v:.4f}"

    lines = [
        f"{name}: {num_images} images, {summary['num_gt']} ground-truth boxes, "
        f"{summary['mean_proposals']:.1f} proposals/image",
        f"{'N':>6}  {'R@0.5':>6}  {'R@0.7':>6}  {'AR':>6}",
    ]
    for n, r in summary["recall"].items():
        lines.append(f"{n:>6}  {f(r['0.5'])}  {f(r['0.7'])}  {f(summary['AR'][n])}")
    return "\n".join(lines)


def plot_recall(curves: Sequence[Tuple[str, Sequence[np.ndarray]]], gt: Sequence[np.ndarray], path) -> Path:
    """curves: (label, proposals per image sorted best first) per method -> a PNG with
    recall@0.5, recall@0.7 and AR (IoU 0.5:0.95) against the number of proposals (log x)."""
    from matplotlib.figure import Figure

    most = max([len(p) for _, props in curves for p in props] + [1])
    counts = np.unique(np.round(np.logspace(0, math.log10(most), 40)).astype(np.int64))
    thresholds = np.round(DEFAULT_IOU_THRESHOLDS, 6)
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for label, props in curves:
        best = best_iou_at_counts(gt, props, counts)  # (G, C)
        if best.shape[0] == 0:
            continue
        r5 = (best >= 0.5).mean(axis=0)
        r7 = (best >= 0.7).mean(axis=0)
        ar = (best[:, :, None] >= thresholds[None, None, :]).mean(axis=(0, 2))
        for ax, y in zip(axes, (r5, r7, ar)):
            ax.plot(counts, y, label=label)
    for ax, title in zip(axes, ("recall at IoU 0.5", "recall at IoU 0.7", "average recall (IoU 0.5:0.95)")):
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="number of proposals", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[0].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

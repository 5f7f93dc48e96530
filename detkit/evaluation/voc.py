"""Pascal VOC average precision, computed exactly as py-faster-rcnn's ``voc_eval`` (the Python
port of the VOC devkit that detectron2 and mmdetection also follow) does.

Shape shorthand: K foreground classes, D detections of one class (whole dataset),
G ground-truth boxes of one class in one image.

The devkit's rules, in the order they apply (per class):

1. Boxes are compared in VOC's *inclusive* pixels. Every box, ground truth or detection and
   whatever the dataset, is converted the same way from detkit's continuous xyxy:
   (x1 + 1, y1 + 1, x2, y2); for VOC datasets that gives back the XML's own numbers.
   Widths, heights and areas then get the devkit's "+1" (w = x2 - x1 + 1).
2. Detections of the class are sorted by descending score over the whole dataset. The sort
   is stable; ties keep the order of ``dataset.records`` and, inside an image, the order
   of the image's arrays (py-faster-rcnn's ``np.argsort`` is not stable, so its tie order
   is arbitrary; this makes ours reproducible).
3. Each detection takes the ground-truth box of its class in its image with the largest
   IoU (first one on ties). It is a true positive when that IoU is *strictly* greater than
   ``iou_thresh`` (py-faster-rcnn's ``ovmax > ovthresh``; the MATLAB devkit's VOCevaldet.m
   writes ``>=``, which differs only when an IoU is exactly the threshold, e.g. integer
   boxes at exactly 0.5) and the box is not yet taken; a second detection of a taken box is a false
   positive (duplicate); a detection whose best box is ``difficult`` is ignored (neither);
   a detection with no box above the threshold (or on an image without boxes of the class)
   is a false positive.
4. npos = number of non-difficult ground-truth boxes; recall = cumTP / npos,
   precision = cumTP / max(cumTP + cumFP, eps).
5. AP: ``voc_ap`` below, 11-point (VOC2007) or area under the monotone curve (VOC2010+).

A class without any non-difficult ground truth has no defined recall (the devkit divides by
zero); its AP is reported as NaN and left out of the mAP. A class with ground truth but no
detections has AP 0.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from detkit.evaluation.detfile import Dets, flatten_dets

VOC_METRICS = ("voc07", "voc")

# The 11 recall thresholds exactly as py-faster-rcnn (and detectron2, mmdetection) make them.
# np.arange yields 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, so a
# recall of exactly 3/10 does not reach "0.3"; we keep the quirk on purpose, so that our
# numbers are the ones those tools publish.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def voc_ap(recall, precision, use_07_metric: bool) -> float:
    """AP of one class from its recall and precision arrays (in descending-score order).

    use_07_metric=True: VOC2007's 11-point interpolated AP, the mean over t in 0, 0.1, ..., 1
    of the largest precision at recall >= t (0 when recall never reaches t).
    use_07_metric=False (VOC2010+): make precision non-increasing from the right (each point
    takes the best precision at any higher recall), then sum rectangle areas at the points
    where recall changes, between recall 0 and 1.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"voc_ap: recall {rec.shape} and precision {prec.shape} differ in shape")

    if use_07_metric:
        best = [prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in VOC07_RECALL_THRESHOLDS]
        ap = np.mean(best)
    else:
        # Sentinels: the curve starts at recall 0 and ends at recall 1 with precision 0.
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        change = np.flatnonzero(mrec[1:] != mrec[:-1])
        ap = np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1])
    # Rounding can leave a perfect AP at 1 + 2e-16 (py-faster-rcnn reports that); an AP is
    # a fraction, so clip.
    return float(np.clip(ap, 0.0, 1.0))


def voc_iou(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """(D, G) IoU of inclusive-pixel boxes (x1, y1, x2, y2) with the devkit's +1 areas.

    The operations are those of the devkit, in its order, so that results are bitwise equal
    to it even where the IoU lands exactly on the threshold.
    """
    d = np.asarray(dets, dtype=np.float64)[:, None, :]
    g = np.asarray(gts, dtype=np.float64)[None, :, :]
    iw = np.maximum(np.minimum(g[..., 2], d[..., 2]) - np.maximum(g[..., 0], d[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(g[..., 3], d[..., 3]) - np.maximum(g[..., 1], d[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    union = (
        (d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
        + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0)
        - inter
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # only degenerate boxes get here
        return inter / union


def to_inclusive(boxes: np.ndarray) -> np.ndarray:
    """detkit's continuous xyxy -> VOC inclusive pixels (x1 + 1, y1 + 1, x2, y2), float64."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def _stack_ground_truth(records):
    """All ground truth of the dataset in one set of arrays, in record order: image index
    (B,), inclusive boxes (B, 4), labels (B,), difficult (B,)."""
    image = [np.full(len(r.labels), i, dtype=np.int64) for i, r in enumerate(records)]
    boxes = [r.boxes.reshape(-1, 4) for r in records]
    labels = [r.labels for r in records]
    difficult = [r.difficult for r in records]
    return (
        np.concatenate(image + [np.zeros(0, np.int64)]),
        to_inclusive(np.concatenate(boxes + [np.zeros((0, 4))])),
        np.concatenate(labels + [np.zeros(0, np.int64)]).astype(np.int64),
        np.concatenate(difficult + [np.zeros(0, bool)]).astype(bool),
    )


def _match_class(gt_boxes, gt_difficult, det_image, det_boxes, iou_thresh):
    """TP/FP flags of one class's detections, which are already in descending-score order.

    gt_boxes / gt_difficult: per image index, that image's boxes of the class (inclusive) and
    difficult flags (only images that have some). Detections only compete for boxes of their
    own image, so each image is matched on its own, visiting its detections in the global
    score order.
    """
    tp = np.zeros(len(det_image))
    fp = np.zeros(len(det_image))
    by_image = np.argsort(det_image, kind="stable")  # keeps score order inside each image
    images, starts = np.unique(det_image[by_image], return_index=True)
    for image, rows in zip(images.tolist(), np.split(by_image, starts[1:])):
        if image not in gt_boxes:
            fp[rows] = 1.0
            continue
        iou = voc_iou(det_boxes[rows], gt_boxes[image])
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(rows)), best]
        difficult = gt_difficult[image]
        taken = np.zeros(len(difficult), dtype=bool)
        for d, j, ov in zip(rows, best, best_iou):
            if not ov > iou_thresh:  # strictly greater, as py-faster-rcnn
                fp[d] = 1.0
            elif difficult[j]:
                pass  # a detection of a difficult object counts neither way
            elif not taken[j]:
                tp[d] = 1.0
                taken[j] = True
            else:
                fp[d] = 1.0  # duplicate detection of an already found object
    return tp, fp


def voc_evaluate(dataset, dets: Dets, metric: str = "voc07", iou_thresh: float = 0.5) -> dict:
    """VOC mAP of ``dets`` on ``dataset`` (see the module docstring for the exact rules).

    metric: "voc07" (11-point AP, as VOC2007 test results are reported) or "voc"
    (area under the monotone PR curve, VOC2010+).

    Returns {"metric", "iou_thresh", "mAP" (mean over classes with ground truth),
    "per_class": {name: AP or NaN}, "pr": {name: (recall (D,), precision (D,))},
    "num_gt": {name: non-difficult ground-truth count}}.
    """
    if metric not in VOC_METRICS:
        raise ValueError(f"unknown VOC metric {metric!r}; valid: {', '.join(VOC_METRICS)}")
    use_07 = metric == "voc07"
    det_image, det_boxes, det_scores, det_labels = flatten_dets(dets, dataset)
    det_boxes = to_inclusive(det_boxes)

    gt_image, gt_boxes_all, gt_labels_all, gt_difficult_all = _stack_ground_truth(dataset.records)

    per_class: Dict[str, float] = {}
    pr: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    num_gt: Dict[str, int] = {}
    for label, name in enumerate(dataset.class_names, start=1):
        # This class's ground truth grouped by image, in the records' own order.
        mine = np.flatnonzero(gt_labels_all == label)
        images, starts = np.unique(gt_image[mine], return_index=True)
        groups = np.split(mine, starts[1:]) if len(mine) else []
        gt_boxes = {i: gt_boxes_all[g] for i, g in zip(images.tolist(), groups)}
        gt_difficult = {i: gt_difficult_all[g] for i, g in zip(images.tolist(), groups)}
        npos = int((~gt_difficult_all[mine]).sum())

        sel = np.flatnonzero(det_labels == label)
        order = sel[np.argsort(-det_scores[sel], kind="stable")]
        tp, fp = _match_class(gt_boxes, gt_difficult, det_image[order], det_boxes[order], iou_thresh)
        num_gt[name] = npos
        if npos == 0:
            per_class[name] = float("nan")
            pr[name] = (np.zeros(0), np.zeros(0))
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / float(npos)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = voc_ap(recall, precision, use_07)
        pr[name] = (recall, precision)

    aps = np.array(list(per_class.values()), dtype=np.float64)
    valid = ~np.isnan(aps)
    return {
        "metric": metric,
        "iou_thresh": float(iou_thresh),
        "mAP": float(aps[valid].mean()) if valid.any() else float("nan"),
        "per_class": per_class,
        "pr": pr,
        "num_gt": num_gt,
    }

"""Error analysis of detections: why the AP is not 1.

Shape shorthand: M detections of the whole dataset, B ground-truth boxes of the whole
dataset (both stacked in ``dataset.records`` order), K foreground classes.

Matching follows the VOC rules of ``detkit.evaluation.voc`` exactly (inclusive pixels,
a true positive needs IoU > 0.5 with an unclaimed box of its class, difficult boxes are
ignored), so the mAP computed here is the VOC mAP. On top of it, every false positive gets
one error type, after Hoiem et al., "Diagnosing Error in Object Detectors" (ECCV 2012) and
Bolya et al., "TIDE" (ECCV 2020), whose definitions and order we follow. With IoU the best
overlap with a ground-truth box, t_f = 0.5 (foreground) and t_b = 0.1 (background):

1. localization:    right class, t_b <= IoU <= t_f with a box of the class (a poor box);
2. classification:  IoU > t_f with a box of another class (right box, wrong class);
3. duplicate:       IoU > t_f with a box of its class that a higher-scoring detection
                    already claimed;
4. classification:  t_b <= IoU with a box of another class (TIDE's "both": wrong class and
                    a poor box; Hoiem's "confusion with a similar object" at IoU >= 0.1);
5. background:      IoU < t_b with every box.

The first test that holds decides. A non-difficult ground-truth box that no detection found
and that no localization or classification error points at is **missed**.

"dAP" (TIDE's measure): the mAP gained when every error of one type is fixed by an oracle,
each type on its own from the same starting point: a localization error gets its target
box, a classification error the target's class (a corrected detection that is then still
not a true positive, e.g. because its box was already found, is removed); duplicates and
background detections are removed; missed boxes leave the ground truth (they stop counting
against recall). As in TIDE, a correction may only claim a box that no true positive
claimed already.

The confusion matrix counts, at a score threshold, each non-difficult ground-truth box by
what it was detected as: its own class (a true positive by the VOC rules), another class
(a remaining detection of another class with IoU > 0.5), or nothing ("missed"); detections
left over (false positives of every kind except class confusions) fill the "background"
row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from detkit.evaluation.detfile import Dets, flatten_dets
from detkit.evaluation.voc import VOC_METRICS, to_inclusive, voc_ap, voc_iou

# The error types, in the order they are reported. "classification" is TIDE's Cls and Both.
ERROR_TYPES = ("localization", "classification", "duplicate", "background", "missed")
FG_IOU = 0.5  # VOC: a true positive needs IoU > 0.5
BG_IOU = 0.1  # Hoiem et al. 2012 sec. 2 / TIDE sec. 2.2: below this a detection is on background

# Detection status after matching.
TP, FP, IGNORED = 1, 0, -1


@dataclass
class GroundTruth:
    """Every ground-truth box of a dataset, stacked in record order: image index (B,),
    boxes (B, 4) continuous xyxy, labels (B,) in 1..K, difficult (B,)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    @classmethod
    def from_records(cls, records) -> "GroundTruth":
        return cls(
            np.concatenate([np.full(len(r.labels), i, np.int64) for i, r in enumerate(records)] + [np.zeros(0, int)]),
            np.concatenate([r.boxes.reshape(-1, 4) for r in records] + [np.zeros((0, 4))]).astype(np.float64),
            np.concatenate([r.labels for r in records] + [np.zeros(0, int)]).astype(np.int64),
            np.concatenate([r.difficult for r in records] + [np.zeros(0, bool)]).astype(bool),
        )


def _by_image(image: np.ndarray) -> Dict[int, np.ndarray]:
    """image index -> the positions (in their original order) that belong to it."""
    order = np.argsort(image, kind="stable")
    images, starts = np.unique(image[order], return_index=True)
    return {int(i): rows for i, rows in zip(images, np.split(order, starts[1:]))}


def match_detections(
    gt: GroundTruth,
    det_image: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    iou_thresh: float = FG_IOU,
) -> Tuple[np.ndarray, np.ndarray]:
    """The VOC matching of every detection: -> (status (M,) in {TP, FP, IGNORED}, index (M,)
    of the ground-truth box it matched, claimed-twice (duplicate) or hit-as-difficult, -1
    when none).

    As ``voc.py``: detections of a class claim, highest score first (ties: earlier in the
    flattened order), the box of their class in their image with the largest IoU (first on
    ties); IoU > ``iou_thresh`` and unclaimed -> TP; difficult -> ignored; claimed -> FP.
    Images are independent, and so are classes, so each image is done on its own.
    """
    m = len(det_scores)
    status = np.full(m, FP, np.int8)
    matched = np.full(m, -1, np.int64)
    gt_rows = _by_image(gt.image)
    inc_gt = to_inclusive(gt.boxes)
    for image, rows in _by_image(det_image).items():
        g = gt_rows.get(image)
        if g is None:
            continue
        rows = rows[np.argsort(-det_scores[rows], kind="stable")]
        iou = voc_iou(to_inclusive(det_boxes[rows]), inc_gt[g])
        taken = np.zeros(len(g), bool)
        for d, row in zip(rows, iou):
            same = gt.labels[g] == det_labels[d]
            if not same.any():
                continue
            cand = np.where(same, row, -np.inf)
            j = int(np.argmax(cand))
            if not cand[j] > iou_thresh:
                continue
            matched[d] = g[j]
            if gt.difficult[g[j]]:
                status[d] = IGNORED
            elif not taken[j]:
                status[d] = TP
                taken[j] = True
    return status, matched


def class_aps(
    num_classes: int,
    labels: np.ndarray,
    scores: np.ndarray,
    status: np.ndarray,
    npos: np.ndarray,
    use_07_metric: bool,
) -> Tuple[np.ndarray, Dict[int, Tuple[np.ndarray, np.ndarray]]]:
    """Per class k (1..K): AP (NaN without non-difficult ground truth) and the PR curve, from
    detections in flattened order (ties keep that order, as in ``voc.py``). npos (K + 1,)."""
    aps = np.full(num_classes, np.nan)
    pr = {}
    for k in range(1, num_classes + 1):
        sel = np.flatnonzero(labels == k)
        order = sel[np.argsort(-scores[sel], kind="stable")]
        if npos[k] == 0:
            pr[k] = (np.zeros(0), np.zeros(0))
            continue
        tp = np.cumsum(status[order] == TP)
        fp = np.cumsum(status[order] == FP)
        recall = tp / float(npos[k])
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[k - 1] = voc_ap(recall, precision, use_07_metric)
        pr[k] = (recall, precision)
    return aps, pr


def _mean(aps: np.ndarray) -> float:
    valid = ~np.isnan(aps)
    return float(aps[valid].mean()) if valid.any() else float("nan")


def classify_errors(
    gt: GroundTruth,
    det_image: np.ndarray,
    det_boxes: np.ndarray,
    det_labels: np.ndarray,
    status: np.ndarray,
    fg_iou: float = FG_IOU,
    bg_iou: float = BG_IOU,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error type of every false positive (see the module docstring).

    -> (type (M,) object: an ERROR_TYPES name for false positives, "" otherwise; target (M,)
    the ground-truth box a localization / classification / duplicate error refers to, else
    -1; iou (M,) the overlap with that box, or the best overlap with any box)."""
    m = len(status)
    kind = np.full(m, "", dtype=object)
    target = np.full(m, -1, np.int64)
    best = np.zeros(m)
    gt_rows = _by_image(gt.image)
    inc_gt = to_inclusive(gt.boxes)
    for d in np.flatnonzero(status == FP):
        g = gt_rows.get(int(det_image[d]))
        if g is None:
            kind[d] = "background"
            continue
        iou = voc_iou(to_inclusive(det_boxes[d : d + 1]), inc_gt[g])[0]
        same = gt.labels[g] == det_labels[d]
        s_iou = np.where(same, iou, -1.0)
        o_iou = np.where(~same, iou, -1.0)
        js, jo = int(np.argmax(s_iou)), int(np.argmax(o_iou))
        if bg_iou <= s_iou[js] <= fg_iou:
            kind[d], target[d], best[d] = "localization", g[js], s_iou[js]
        elif o_iou[jo] > fg_iou:
            kind[d], target[d], best[d] = "classification", g[jo], o_iou[jo]
        elif s_iou[js] > fg_iou:
            kind[d], target[d], best[d] = "duplicate", g[js], s_iou[js]
        elif o_iou[jo] >= bg_iou:
            kind[d], target[d], best[d] = "classification", g[jo], o_iou[jo]
        else:
            kind[d], best[d] = "background", float(iou.max())
    return kind, target, best


def confusion_matrix(
    gt: GroundTruth,
    num_classes: int,
    det_image: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    score_thresh: float = 0.5,
    iou_thresh: float = FG_IOU,
) -> np.ndarray:
    """(K + 1, K + 1) counts; row = ground truth 1..K then background (index K), column =
    detected as 1..K then missed (index K). Only detections with score >= ``score_thresh``;
    difficult boxes and the detections matching them are left out (see the module docstring)."""
    keep = det_scores >= score_thresh
    idx = np.flatnonzero(keep)
    status, matched = match_detections(gt, det_image[idx], det_boxes[idx], det_scores[idx], det_labels[idx], iou_thresh)
    k = num_classes
    cm = np.zeros((k + 1, k + 1), np.int64)
    found = np.zeros(len(gt.labels), bool)
    for d, s, j in zip(idx, status, matched):
        if s == TP:
            cm[gt.labels[j] - 1, det_labels[d] - 1] += 1
            found[j] = True
    # Left-over detections, highest score first, may claim a left-over box of another class.
    rest = idx[status == FP]
    rest = rest[np.argsort(-det_scores[rest], kind="stable")]
    gt_rows = _by_image(gt.image)
    inc_gt = to_inclusive(gt.boxes)
    for d in rest:
        g = gt_rows.get(int(det_image[d]))
        if g is not None:
            free = ~found[g] & ~gt.difficult[g] & (gt.labels[g] != det_labels[d])
            iou = np.where(free, voc_iou(to_inclusive(det_boxes[d : d + 1]), inc_gt[g])[0], -1.0)
            j = int(np.argmax(iou))
            if iou[j] > iou_thresh:
                cm[gt.labels[g[j]] - 1, det_labels[d] - 1] += 1
                found[g[j]] = True
                continue
        cm[k, det_labels[d] - 1] += 1
    for j in np.flatnonzero(~found & ~gt.difficult):
        cm[gt.labels[j] - 1, k] += 1
    return cm


def analyze_detections(
    dataset,
    dets: Dets,
    metric: str = "voc",
    iou_thresh: float = FG_IOU,
    bg_iou_thresh: float = BG_IOU,
    score_thresh: float = 0.5,
    fix_errors: bool = True,
) -> dict:
    """The error analysis of ``dets`` on ``dataset`` (records with boxes in original pixels).

    metric: "voc" (area AP) or "voc07" (11-point) for the APs; any other name (e.g. "coco")
    uses "voc": the analysis is defined at IoU 0.5.

    Returns {"metric", "iou_thresh", "bg_iou_thresh", "mAP", "per_class": {name: AP},
    "num_gt": {name: n}, "pr": {name: (recall, precision)}, "true_positives", "ignored",
    "errors": {type: count}, "errors_per_class": {name: {type: count}}, "dAP": {type: mAP
    gained} (with ``fix_errors``), "confusion": (K+1, K+1) ndarray, "confusion_score_thresh",
    "false_positives": [dict(image_index, box, label, score, type, target_label, iou)] by
    descending score, "missed": [dict(image_index, box, label, area)] by descending area}.
    """
    if metric not in VOC_METRICS:
        metric = "voc"
    use_07 = metric == "voc07"
    names = list(dataset.class_names)
    k = len(names)
    image, boxes, scores, labels = flatten_dets(dets, dataset)
    gt = GroundTruth.from_records(dataset.records)
    npos = np.bincount(gt.labels[~gt.difficult], minlength=k + 1)

    status, matched = match_detections(gt, image, boxes, scores, labels, iou_thresh)
    aps, pr = class_aps(k, labels, scores, status, npos, use_07)
    kind, target, best = classify_errors(gt, image, boxes, labels, status, iou_thresh, bg_iou_thresh)

    found = np.zeros(len(gt.labels), bool)
    found[matched[status == TP]] = True
    pointed = np.zeros(len(gt.labels), bool)
    fixable = (kind == "localization") | (kind == "classification")
    pointed[target[fixable]] = True
    missed = ~found & ~gt.difficult & ~pointed

    errors = {t: int((kind == t).sum()) for t in ERROR_TYPES[:-1]}
    errors["missed"] = int(missed.sum())
    per_class: Dict[str, Dict[str, int]] = {}
    for c, name in enumerate(names, start=1):
        mine = labels == c
        counts = {t: int(((kind == t) & mine).sum()) for t in ERROR_TYPES[:-1]}
        counts["missed"] = int((missed & (gt.labels == c)).sum())
        per_class[name] = counts

    result = {
        "metric": metric,
        "iou_thresh": float(iou_thresh),
        "bg_iou_thresh": float(bg_iou_thresh),
        "mAP": _mean(aps),
        "per_class": {name: float(a) for name, a in zip(names, aps)},
        "num_gt": {name: int(npos[c]) for c, name in enumerate(names, start=1)},
        "pr": {names[c - 1]: curve for c, curve in pr.items()},
        "true_positives": int((status == TP).sum()),
        "ignored": int((status == IGNORED).sum()),
        "errors": errors,
        "errors_per_class": per_class,
        "confusion": confusion_matrix(gt, k, image, boxes, scores, labels, score_thresh, iou_thresh),
        "confusion_score_thresh": float(score_thresh),
    }
    if fix_errors:
        base = _mean(aps)
        result["dAP"] = {
            t: _fixed_map(t, gt, k, image, boxes, scores, labels, kind, target, found, missed, iou_thresh, use_07)
            - base
            for t in ERROR_TYPES
        }
    fps = np.flatnonzero(status == FP)
    fps = fps[np.argsort(-scores[fps], kind="stable")]
    result["false_positives"] = [
        {
            "image_index": int(image[d]),
            "box": [float(v) for v in boxes[d]],
            "label": int(labels[d]),
            "score": float(scores[d]),
            "type": str(kind[d]),
            "target_label": int(gt.labels[target[d]]) if target[d] >= 0 else 0,
            "iou": float(best[d]),
        }
        for d in fps
    ]
    miss = np.flatnonzero(missed)
    area = (gt.boxes[miss, 2] - gt.boxes[miss, 0]) * (gt.boxes[miss, 3] - gt.boxes[miss, 1])
    miss = miss[np.argsort(-area, kind="stable")]
    result["missed"] = [
        {
            "image_index": int(gt.image[j]),
            "box": [float(v) for v in gt.boxes[j]],
            "label": int(gt.labels[j]),
            "area": float((gt.boxes[j, 2] - gt.boxes[j, 0]) * (gt.boxes[j, 3] - gt.boxes[j, 1])),
        }
        for j in miss
    ]
    return result


def _fixed_map(
    error: str,
    gt: GroundTruth,
    k: int,
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    kind: np.ndarray,
    target: np.ndarray,
    found: np.ndarray,
    missed: np.ndarray,
    iou_thresh: float,
    use_07: bool,
) -> float:
    """mAP after an oracle fixed every error of type ``error`` (module docstring). ``found``
    (B,): the boxes true positives claimed; ``missed`` (B,): the missed boxes."""
    boxes, labels = boxes.copy(), labels.copy()
    keep = np.ones(len(scores), bool)
    difficult = gt.difficult
    fixed = kind == error
    if error in ("localization", "classification"):
        # A correction may only claim a box that no true positive has claimed (TIDE).
        blocked = fixed & found[np.maximum(target, 0)]
        keep &= ~blocked
        fix = fixed & ~blocked
        if error == "localization":
            boxes[fix] = gt.boxes[target[fix]]
        else:
            labels[fix] = gt.labels[target[fix]]
    elif error in ("duplicate", "background"):
        keep &= ~fixed
    elif error == "missed":
        difficult = difficult | missed  # out of the ground truth: no longer counted in npos
    else:
        raise ValueError(f"unknown error type {error!r}; valid: {', '.join(ERROR_TYPES)}")
    gt2 = GroundTruth(gt.image, gt.boxes, gt.labels, difficult)
    idx = np.flatnonzero(keep)
    status2, _ = match_detections(gt2, image[idx], boxes[idx], scores[idx], labels[idx], iou_thresh)
    if error in ("localization", "classification"):
        # A corrected detection that is still not a true positive (its box was found by a
        # higher-scoring correction) is removed: fixing must not add false positives.
        drop = fixed[idx] & (status2 != TP)
        idx, status2 = idx[~drop], status2[~drop]
    npos = np.bincount(gt2.labels[~gt2.difficult], minlength=k + 1)
    aps, _ = class_aps(k, labels[idx], scores[idx], status2, npos, use_07)
    return _mean(aps)


def analysis_to_json(result: dict, dataset=None) -> dict:
    """The JSON-safe part of an analysis: numbers, counts, the confusion matrix as lists, no
    PR arrays; NaN becomes null. With ``dataset``, false positives and misses name their
    image id and class."""

    def num(v):
        v = float(v)
        return None if np.isnan(v) else v

    out: Dict[str, object] = {}
    for key, value in result.items():
        if key == "pr":
            continue
        if key in ("per_class", "dAP"):
            out[key] = {n: num(v) for n, v in value.items()}
        elif key == "mAP":
            out[key] = num(value)
        elif key == "confusion":
            out[key] = np.asarray(value).tolist()
        elif key in ("false_positives", "missed") and dataset is not None:
            names = dataset.class_names
            out[key] = [
                {
                    **e,
                    "image_id": dataset.records[e["image_index"]].image_id,
                    "class": names[e["label"] - 1],
                    **(
                        {"target_class": names[e["target_label"] - 1] if e["target_label"] else None}
                        if "target_label" in e
                        else {}
                    ),
                }
                for e in value
            ]
        else:
            out[key] = value
    if dataset is not None:
        out["classes"] = list(dataset.class_names)
    return out


def format_errors(result: dict) -> str:
    """A plain-text table: per class the count of each error type; the total row; dAP."""
    names = list(result["errors_per_class"])
    width = max([len("class"), len("dAP (pts)")] + [len(n) for n in names])
    short = {"localization": "loc", "classification": "cls", "duplicate": "dup", "background": "bkg", "missed": "miss"}
    head = f"{'class':<{width}}" + "".join(f"  {short[t]:>6}" for t in ERROR_TYPES)
    rule = "-" * len(head)
    lines = [
        f"errors (Hoiem et al. 2012 / TIDE; IoU > {result['iou_thresh']:g}, background < {result['bg_iou_thresh']:g})"
    ]
    lines += [head, rule]
    for n in names:
        lines.append(f"{n:<{width}}" + "".join(f"  {result['errors_per_class'][n][t]:>6}" for t in ERROR_TYPES))
    lines.append(rule)
    lines.append(f"{'all':<{width}}" + "".join(f"  {result['errors'][t]:>6}" for t in ERROR_TYPES))
    if "dAP" in result:
        lines.append(f"{'dAP (pts)':<{width}}" + "".join(f"  {100 * result['dAP'][t]:>6.2f}" for t in ERROR_TYPES))
    return "\n".join(lines)

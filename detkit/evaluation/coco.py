"""COCO box AP through pycocotools' ``COCOeval`` (iouType "bbox").

Shape shorthand: K foreground classes; COCOeval's precision array is (T, R, K, A, M):
T = 10 IoU thresholds .50:.05:.95, R = 101 recall points, A = 4 area ranges
(all, small, medium, large), M = 3 max-detection limits (1, 10, 100).

Ground truth:
- COCO datasets (``dataset.coco`` set): the json itself, so areas (segment areas) and
  ``iscrowd`` are the official ones; image ids are the records' ids (the json's) and class
  labels map to category ids through ``dataset.label_to_cat_id``. Only the dataset's images
  and categories are evaluated.
- Any other dataset (VOC, generated shapes): a COCO object built in memory from
  ``dataset.records`` with image ids 1..N, category id = label, bbox xywh from detkit's
  xyxy, area = w * h. ``difficult`` boxes become ``iscrowd=1``: COCOeval ignores them, and a
  detection matched to one counts neither as a true nor as a false positive, which is the
  VOC meaning of difficult. (COCOeval measures overlap with a crowd box as intersection over
  the *detection's* area, so the match itself is a little looser than VOC's.)

Classes without ground truth get NaN (pycocotools' -1) and are left out of the means, as in
pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from typing import Any, Dict, List, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.evaluation.detfile import Dets, flatten_dets

# Names of COCOeval.stats in its own order (summarize() for iouType "bbox").
COCO_STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _nan_if_absent(value: float) -> float:
    """pycocotools writes -1 where nothing was there to evaluate."""
    return float("nan") if value <= -1 else float(value)


def _build_coco(dataset) -> COCO:
    """An in-memory COCO ground truth of a non-COCO dataset (see the module docstring)."""
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for index, rec in enumerate(dataset.records):
        images.append(
            {"id": index + 1, "width": int(rec.width), "height": int(rec.height), "file_name": str(rec.file_name)}
        )
        for box, label, difficult in zip(rec.boxes.astype(np.float64), rec.labels, rec.difficult):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(bool(difficult)),
                }
            )
    categories = [{"id": k, "name": name} for k, name in enumerate(dataset.class_names, start=1)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco


def _ground_truth(dataset) -> Tuple[COCO, List, Dict[int, int], float]:
    """(COCO ground truth, COCO image id per record, label -> category id, offset added to
    detkit's x1, y1 to reach the ground truth's coordinates)."""
    if dataset.coco is None:
        # Both sides stay in detkit's coordinates, so no offset.
        image_ids = list(range(1, len(dataset.records) + 1))
        identity = {k: k for k in range(1, len(dataset.class_names) + 1)}
        return _build_coco(dataset), image_ids, identity, 0.0
    coco = dataset.coco
    known = set(coco.getImgIds())
    image_ids = [r.image_id for r in dataset.records]
    missing = [i for i in image_ids if i not in known]
    if missing:
        raise ValueError(
            f"dataset {dataset.name!r}: image id {missing[0]!r} is not in its COCO json ({len(missing)} such)"
        )
    cat_ids = set(coco.getCatIds())
    unknown = [c for c in dataset.label_to_cat_id.values() if c not in cat_ids]
    if unknown:
        raise ValueError(f"dataset {dataset.name!r}: category id {unknown[0]} is not in its COCO json")
    return coco, image_ids, dict(dataset.label_to_cat_id), dataset.native_offset


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (``COCO.loadRes`` fails on an empty list)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "annotations": [],
        "categories": list(coco_gt.dataset["categories"]),
    }
    res.createIndex()
    return res


def coco_evaluate(dataset, dets: Dets, verbose: bool = False) -> dict:
    """COCO box AP of ``dets`` on ``dataset``.

    Returns {"metric": "coco", "mAP" (AP@[.5:.95]), "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "per_class": {name: AP@[.5:.95]},
    "pr": {name: (recall (101,), precision (101,)) at IoU 0.5, all areas, 100 detections},
    "num_gt": {name: non-crowd ground-truth count}}; NaN where pycocotools has nothing to
    evaluate. ``verbose`` lets pycocotools print its usual summary.
    """
    det_image, boxes, scores, labels = flatten_dets(dets, dataset)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext()
    with quiet:  # pycocotools prints progress on every step
        coco_gt, image_ids, label_to_cat, offset = _ground_truth(dataset)
        results = [
            {
                "image_id": image_ids[i],
                "category_id": int(label_to_cat[int(k)]),
                "bbox": [float(b[0] + offset), float(b[1] + offset), float(b[2] - b[0]), float(b[3] - b[1])],
                "score": float(s),
            }
            for i, b, s, k in zip(det_image, boxes, scores, labels)
        ]
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = list(image_ids)
        ev.params.catIds = sorted(int(c) for c in label_to_cat.values())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    result: Dict[str, Any] = {"metric": "coco"}
    result.update({name: _nan_if_absent(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)})
    precision = ev.eval["precision"]  # (T, R, K, A, M), K in params.catIds order
    recall_points = np.asarray(ev.params.recThrs, dtype=np.float64)
    gt_anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(image_ids)))
    gt_count = Counter(a["category_id"] for a in gt_anns if not a.get("iscrowd", 0))
    per_class, pr, num_gt = {}, {}, {}
    for label, name in enumerate(dataset.class_names, start=1):
        k = ev.params.catIds.index(int(label_to_cat[label]))
        p = precision[:, :, k, 0, -1]  # all areas, 100 detections
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
        p50 = precision[0, :, k, 0, -1]
        has_curve = (p50 > -1).all()
        pr[name] = (recall_points.copy(), p50.copy()) if has_curve else (np.zeros(0), np.zeros(0))
        num_gt[name] = gt_count[label_to_cat[label]]
    result["per_class"] = per_class
    result["pr"] = pr
    result["num_gt"] = num_gt
    return result

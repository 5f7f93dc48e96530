"""Evaluation: VOC AP (devkit-exact), COCO AP (pycocotools), proposal recall, the detection
file format and reports.

Every evaluator takes detections as ``Dets`` (see ``detkit.evaluation.detfile``):
``{image_id: dict(boxes=(R, 4) xyxy original pixels, scores=(R,), labels=(R,) in 1..K)}``.
"""

from detkit.evaluation.coco import coco_evaluate
from detkit.evaluation.detfile import (
    DetectionFileError,
    Dets,
    dets_to_json,
    load_detections,
    save_detections,
)
from detkit.evaluation.recall import dataset_gt_boxes, proposal_recall, recall_curve
from detkit.evaluation.report import METRICS, evaluate, format_table, plot_pr_curves, write_result
from detkit.evaluation.voc import voc_ap, voc_evaluate, voc_iou

__all__ = [
    "METRICS",
    "DetectionFileError",
    "Dets",
    "coco_evaluate",
    "dataset_gt_boxes",
    "dets_to_json",
    "evaluate",
    "format_table",
    "load_detections",
    "plot_pr_curves",
    "proposal_recall",
    "recall_curve",
    "save_detections",
    "voc_ap",
    "voc_evaluate",
    "voc_iou",
    "write_result",
]

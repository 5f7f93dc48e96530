"""Writing an error analysis (``detkit eval --analyze``, ``detkit report``): the numbers
from ``detkit.evaluation.analysis`` drawn as figures and image crops.

    result = analyze_detections(dataset, dets, metric)     # evaluation layer, pure numpy
    paths = write_analysis(result, dataset, out_dir)         # PNGs + analysis.json

out_dir receives:
    analysis.json               counts per error type and class, dAP, confusion matrix, the
                                worst false positives and misses (image id, box, class)
    pr_curves.png               every class's precision/recall curve in one plot
    pr_curves/pr_<class>.png    one plot per class
    confusion_matrix.png        ground truth x detected-as, with background and missed
    errors.png                  error counts per type and the mAP gained by fixing each
    worst_false_positives.png   the highest-scoring false positives, cropped, with their type
    worst_misses.png            the largest missed objects, cropped
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detkit.data.io import read_image_array
from detkit.errors import ImageReadError
from detkit.evaluation.analysis import analysis_to_json
from detkit.evaluation.report import plot_pr_curves
from detkit.visualize import (
    ERROR_LABELS,
    class_color,
    confusion_matrix_figure,
    contact_sheet,
    crop_with_context,
    draw_boxes,
    draw_detections,
    draw_style,
    error_breakdown_figure,
    pr_curves_figure,
    save_figure,
    save_rgb,
)

logger = logging.getLogger("detkit")

CROP_CELL = (200, 160)  # (width, height) of one crop in the grids


def _scaled_crop(image: np.ndarray, box, cell: Tuple[int, int]) -> Tuple[np.ndarray, float, int, int]:
    """The context crop around ``box`` resized to fit ``cell``: (crop, scale, x0, y0), so that
    a box maps to (box - (x0, y0)) * scale."""
    crop, x0, y0 = crop_with_context(image, box, context=0.5, min_size=32)
    h, w = crop.shape[:2]
    scale = min(cell[0] / max(w, 1), cell[1] / max(h, 1))
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    resized = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return resized, scale, x0, y0


def _to_crop(boxes, scale: float, x0: int, y0: int) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    b[:, 0::2] = (b[:, 0::2] - x0) * scale
    b[:, 1::2] = (b[:, 1::2] - y0) * scale
    return b


def error_crops(
    entries: Sequence[dict], dataset, num: int = 16, cell: Tuple[int, int] = CROP_CELL
) -> Optional[np.ndarray]:
    """A grid of crops, one per entry of ``result["false_positives"]`` or ``["missed"]``
    (the first ``num``), or None when there is nothing to show.

    False positives: the detection solid with "class score", the image's ground truth dashed;
    the caption says the error type. Misses: the missed box dashed, with its class."""
    names = dataset.class_names
    tiles, titles = [], []
    unreadable = 0
    for e in entries[:num]:
        rec = dataset.records[e["image_index"]]
        try:
            image = read_image_array(rec.file_name)
        except ImageReadError:
            unreadable += 1
            continue
        crop, scale, x0, y0 = _scaled_crop(image, e["box"], cell)
        style = draw_style(*cell[::-1])
        name = names[e["label"] - 1]
        if "score" in e:  # a false positive
            # The image's ground truth, dashed (the box an error refers to is among them).
            gt = _to_crop(rec.boxes, scale, x0, y0)
            tile = draw_boxes(crop, gt, rec.labels, names, dashed=True, show_labels=False, style=style)
            tile = draw_boxes(tile, _to_crop(e["box"], scale, x0, y0), [e["label"]], names, [e["score"]], style=style)
            kind = ERROR_LABELS.get(e["type"], e["type"])
            extra = f" on {names[e['target_label'] - 1]}" if e["type"] == "classification" else ""
            titles.append(f"{kind}{extra}, {rec.image_id}")
        else:
            tile = draw_boxes(crop, _to_crop(e["box"], scale, x0, y0), [e["label"]], names, dashed=True, style=style)
            w, h = e["box"][2] - e["box"][0], e["box"][3] - e["box"][1]
            titles.append(f"{name} {w:.0f}x{h:.0f}, {rec.image_id}")
        tiles.append(tile)
    if unreadable:
        logger.warning("error crops: skipped %d unreadable image(s)", unreadable)
    if not tiles:
        return None
    legend = [(n, class_color(k)) for k, n in enumerate(names, start=1)]
    return contact_sheet(tiles, titles, cell=cell, cols=min(4, len(tiles)), legend=legend)


def analysis_figures(result: dict, class_names: Sequence[str]) -> Dict[str, object]:
    """The figures of an analysis: {"pr_curves", "confusion_matrix", "errors": Figure}."""
    metric = result["metric"]
    return {
        "pr_curves": pr_curves_figure(
            result["pr"], result["per_class"], title=f"precision / recall ({metric}, mAP {result['mAP']:.4f})"
        ),
        "confusion_matrix": confusion_matrix_figure(
            result["confusion"],
            class_names,
            title=f"confusion matrix (score >= {result['confusion_score_thresh']:g})",
        ),
        "errors": error_breakdown_figure(result["errors"], result.get("dAP")),
    }


def write_analysis(result: dict, dataset, out_dir, num_crops: int = 16) -> Dict[str, Path]:
    """Writes the analysis files (module docstring) -> {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    path = out_dir / "analysis.json"
    with open(path, "w") as f:
        json.dump(analysis_to_json(result, dataset), f, indent=1, allow_nan=False)
        f.write("\n")
    paths["analysis"] = path
    for name, fig in analysis_figures(result, dataset.class_names).items():
        paths[name] = save_figure(fig, out_dir / f"{name}.png")
    plot_pr_curves(result, out_dir / "pr_curves")
    for key, file in (("false_positives", "worst_false_positives"), ("missed", "worst_misses")):
        sheet = error_crops(result[key], dataset, num_crops)
        if sheet is not None:
            paths[file] = out_dir / f"{file}.png"
            save_rgb(paths[file], sheet)
    return paths


def gallery_images(
    dataset, dets: Dict, indices: Sequence[int], score_thresh: float = 0.5
) -> List[Tuple[str, np.ndarray]]:
    """[(caption, image)] of the records at ``indices``: detections with score >=
    ``score_thresh`` solid and labelled, ground truth dashed. Unreadable images are skipped
    (counted in a warning)."""
    out = []
    unreadable = 0
    for i in indices:
        rec = dataset.records[i]
        try:
            image = read_image_array(rec.file_name)
        except ImageReadError:
            unreadable += 1
            continue
        det = dets.get(rec.image_id)
        if det is not None:
            keep = np.asarray(det["scores"]) >= score_thresh
            boxes, scores, labels = (np.asarray(det[k])[keep] for k in ("boxes", "scores", "labels"))
        else:
            boxes, scores, labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        drawn = draw_detections(image, boxes, scores, labels, dataset.class_names, rec.boxes, rec.labels)
        out.append((f"{rec.image_id}: {len(boxes)} det / {int((~rec.difficult).sum())} gt", drawn))
    if unreadable:
        logger.warning("gallery: skipped %d unreadable image(s)", unreadable)
    return out

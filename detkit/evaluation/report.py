"""One entry point for every metric, and ways to show a result: a table, a JSON file and
precision/recall plots.

A *result* is the dict returned by ``voc_evaluate`` or ``coco_evaluate``: at least
{"metric", "mAP", "per_class": {name: AP}}, with "num_gt" and "pr" (per class
(recall, precision) arrays) where the evaluator provides them. APs are fractions in [0, 1];
NaN marks a class without ground truth.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import List

import numpy as np

from detkit.evaluation.coco import coco_evaluate
from detkit.evaluation.detfile import Dets
from detkit.evaluation.voc import voc_evaluate

METRICS = ("voc07", "voc", "coco")

# Summary numbers of a COCO result, in the order pycocotools prints them.
_COCO_SUMMARY = ("AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def evaluate(dataset, dets: Dets, metric: str = "voc07", **kwargs) -> dict:
    """Evaluates ``dets`` with ``metric``: "voc07" (VOC2007 11-point AP at IoU > 0.5),
    "voc" (VOC2010+ area AP) or "coco" (AP@[.5:.95] with pycocotools). Extra keyword
    arguments go to the evaluator (``iou_thresh`` for VOC, ``verbose`` for COCO)."""
    if metric in ("voc07", "voc"):
        return voc_evaluate(dataset, dets, metric=metric, **kwargs)
    if metric == "coco":
        return coco_evaluate(dataset, dets, **kwargs)
    raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _title(result: dict) -> str:
    metric = result["metric"]
    if metric == "voc07":
        return f"VOC2007 11-point AP, IoU > {result.get('iou_thresh', 0.5):g}"
    if metric == "voc":
        return f"VOC2010+ area AP, IoU > {result.get('iou_thresh', 0.5):g}"
    if metric == "coco":
        return "COCO AP@[.50:.95]"
    return str(metric)


def format_table(result: dict) -> str:
    """A fixed-width, plain-text table: one row per class (ground-truth count when known and
    AP), the mAP row, and for COCO the other summary numbers. "n/a" marks NaN."""
    per_class = result["per_class"]
    num_gt = result.get("num_gt", {})
    width = max([len("class"), len("AP100")] + [len(str(n)) for n in per_class])
    lines = [_title(result)]
    header = f"{'class':<{width}}  {'#gt':>7}  {'AP':>7}"
    rule = "-" * len(header)
    lines += [header, rule]
    for name, ap in per_class.items():
        gt = num_gt.get(name)
        lines.append(f"{name:<{width}}  {'' if gt is None else gt:>7}  {_fmt(ap):>7}")
    lines.append(rule)
    total = sum(num_gt.values()) if num_gt else ""
    lines.append(f"{'mAP':<{width}}  {total:>7}  {_fmt(result['mAP']):>7}")
    if result["metric"] == "coco":
        lines.append("")
        for key in _COCO_SUMMARY:
            if key in result:
                lines.append(f"{key:<{width}}  {'':>7}  {_fmt(result[key]):>7}")
    return "\n".join(lines)


def _json_number(value):
    """NaN is not JSON; write null."""
    value = float(value)
    return None if math.isnan(value) else value


def result_to_json(result: dict) -> dict:
    """The JSON-safe part of a result: every number and per-class table, no PR arrays."""
    out = {}
    for key, value in result.items():
        if key == "pr":
            continue
        if key == "per_class":
            out[key] = {name: _json_number(v) for name, v in value.items()}
        elif key == "num_gt":
            out[key] = {name: int(v) for name, v in value.items()}
        elif isinstance(value, (float, int, np.number)) and not isinstance(value, bool):
            out[key] = _json_number(value)
        else:
            out[key] = value
    return out


def write_result(result: dict, out_json) -> Path:
    """Writes the result as JSON ({"metric", "mAP", "per_class", ...}; NaN as null)."""
    path = Path(out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result_to_json(result), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def plot_pr_curves(result: dict, out_dir) -> List[Path]:
    """One PNG per class with ground truth, ``pr_<class>.png`` in ``out_dir``; returns the
    paths. VOC results plot the raw curve (the AP uses its monotone envelope); COCO results
    plot pycocotools' interpolated precision at IoU 0.5."""
    if "pr" not in result:
        raise ValueError(f"result of metric {result.get('metric')!r} has no precision/recall curves to plot")
    # The object-oriented API draws with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (recall, precision) in result["pr"].items():
        if len(recall) == 0:
            continue  # no ground truth: no curve
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        ax.plot(np.asarray(recall), np.asarray(precision), drawstyle="steps-post")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.02),
            xlabel="recall",
            ylabel="precision",
            title=f"{name}: AP {_fmt(result['per_class'].get(name, float('nan')))} ({result['metric']})",
        )
        ax.grid(True, alpha=0.3)
        path = out_dir / f"pr_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(name))}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written

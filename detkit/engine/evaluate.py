"""Evaluation orchestration shared by ``detkit train``, ``detkit eval`` and the tools:
score detections with the config's metric (and its extra metrics), and write a run's
evaluation files.

    result = evaluate_detections(cfg.test, dets, dataset)     # {"metric", "mAP", "per_class", ...}
    write_evaluation(result, dets, dataset, out_dir)           # eval.json + detections.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

from detkit.evaluation.detfile import Dets, save_detections
from detkit.evaluation.report import evaluate, format_table, plot_pr_curves, result_to_json, write_result
from detkit.schema import TestConfig


def evaluate_detections(test_cfg: TestConfig, dets: Dets, dataset) -> Dict:
    """The config's main metric decides "mAP"; each of ``test_cfg.extra_metrics`` adds
    ``result["extra"][metric] = {"mAP", "per_class"}``."""
    result = evaluate(dataset, dets, test_cfg.metric)
    extra = {}
    for metric in test_cfg.extra_metrics:
        if metric != test_cfg.metric:
            r = evaluate(dataset, dets, metric)
            extra[metric] = result_to_json({"mAP": r["mAP"], "per_class": r["per_class"]})
    if extra:
        result["extra"] = extra
    return result


def evaluator_for(test_cfg: TestConfig) -> Callable[[Dets, object], Dict]:
    """``evaluate_detections`` bound to a config: what the trainer calls after training."""
    return lambda dets, dataset: evaluate_detections(test_cfg, dets, dataset)


def summary_lines(result: Dict) -> str:
    """The per-class table plus one line per extra metric."""
    lines = [format_table(result)]
    for metric, r in result.get("extra", {}).items():
        lines.append(f"{metric}: mAP {r['mAP']:.4f}" if r["mAP"] is not None else f"{metric}: mAP n/a")
    return "\n".join(lines)


def write_evaluation(result: Dict, dets: Optional[Dets], dataset, out_dir, plot: bool = False) -> Path:
    """out_dir/eval.json (+ detections.json when ``dets`` is given, + pr_curves/ with
    ``plot``). -> the eval.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {k: v for k, v in result.items() if k != "dets"}
    if dets is not None:
        save_detections(out_dir / "detections.json", dets, dataset)
    path = write_result(result, out_dir / "eval.json")
    if plot:
        plot_pr_curves(result, out_dir / "pr_curves")
    return path

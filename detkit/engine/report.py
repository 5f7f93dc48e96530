"""Reading a run folder back: training curves (``detkit plot``) and the one-page HTML
report (``detkit report``).

A run folder (see ``detkit.engine.trainer``) holds config.yaml, metrics.jsonl, checkpoints,
eval.json and detections.json. Everything here reads only those files, so it works on runs
from any machine and while a run is still training.

metrics.jsonl has one JSON object per line: training records {"iter", "lr", "loss",
"loss_<term>", "s_per_iter", ...}, evaluation records {"iter", "eval_metric", "eval_mAP",
"val_loss", "val_loss_<term>", ...}, and one {"iter", "train_minutes"} per training session.

The report is a single HTML file with every image embedded (base64 PNG): it opens in any
browser, from any folder, without a server, and can be mailed as one file.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from detkit.errors import DetkitError, UsageError
from detkit.visualize import figure_png, png_bytes, training_curves_figure

logger = logging.getLogger("detkit")

METRICS_FILE = "metrics.jsonl"


class RunFolderError(UsageError):
    """A folder that is not a (readable) detkit run."""


def check_run_dir(path) -> Path:
    """``path`` if it is a folder holding a detkit run (config.yaml or metrics.jsonl), else a
    one-line ``RunFolderError``."""
    p = Path(path)
    if not p.exists():
        raise RunFolderError(f"run folder not found: {p}")
    if not p.is_dir():
        raise RunFolderError(f"{p} is not a folder (expected a run folder from detkit train)")
    if not (p / "config.yaml").is_file() and not (p / METRICS_FILE).is_file():
        raise RunFolderError(f"{p} is not a detkit run folder (no config.yaml or {METRICS_FILE})")
    return p


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(run_dir) -> List[Dict]:
    """The records of ``run_dir/metrics.jsonl`` that have an iteration, sorted by it; only
    numeric values are kept (plus "eval_metric"). A later record of the same iteration and
    kind replaces an earlier one.

    A last line cut off by a crash (or being written right now) is skipped with a warning,
    as ``detkit train --resume`` drops it too. A missing or empty file, a file without any
    complete record, or a damaged line before the last are one-line ``RunFolderError``s."""
    p = check_run_dir(run_dir) / METRICS_FILE
    if not p.is_file():
        raise RunFolderError(f"{p} not found: the run has not logged anything yet (or this is not a run folder)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"cannot read {p}: {exc}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines):
                logger.warning("%s: skipped the cut-off last line %d", p, n)
                continue
            raise RunFolderError(f"{p}: line {n} is not JSON (damaged file?): {line[:60]!r}") from None
        if not isinstance(record, dict):
            raise RunFolderError(f"{p}: line {n} is not a JSON object")
        if not _number(record.get("iter")):
            continue
        clean = {k: v for k, v in record.items() if _number(v) or k == "eval_metric"}
        kind = "eval" if "eval_mAP" in clean else "time" if "train_minutes" in clean else "train"
        records[(clean["iter"], kind)] = clean
    if not records:
        raise RunFolderError(f"{p} holds no complete record (cut off or empty)")
    return [records[key] for key in sorted(records, key=lambda kv: (kv[0], kv[1]))]


def run_names(run_dirs: Sequence, names: Optional[Sequence[str]] = None) -> List[str]:
    """Legend names: the given ``names``, else each folder's name (its parent's name added
    where two runs would share one)."""
    if names:
        if len(names) != len(run_dirs):
            raise UsageError(f"--names gives {len(names)} names for {len(run_dirs)} runs")
        return list(names)
    paths = [Path(r).resolve() for r in run_dirs]
    base = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if base.count(p.name) > 1 else p.name for p in paths]


def curves_figure(run_dirs: Sequence, names: Optional[Sequence[str]] = None):
    """The training-curves figure of one or several runs (overlaid, one colour per run)."""
    labels = run_names(run_dirs, names)
    runs = {name: read_metrics(d) for name, d in zip(labels, run_dirs)}
    try:
        return training_curves_figure(runs, title=" vs ".join(labels) if len(runs) > 1 else labels[0])
    except ValueError as exc:
        raise RunFolderError(f"{', '.join(map(str, run_dirs))}: {exc}") from None


def plot_runs(run_dirs: Sequence, out_png, names: Optional[Sequence[str]] = None) -> Path:
    """Writes the training curves of ``run_dirs`` to ``out_png``."""
    fig = curves_figure(run_dirs, names)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure_png(fig))
    return out


# -- the HTML report -----------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; } .big { font-size: 1.3em; } .note { color: #a60; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; width: 260px; } .gallery img { width: 260px; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; color: #555; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def _img(data: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _per_class_table(result: dict) -> str:
    num_gt = result.get("num_gt", {})
    extra = result.get("extra", {})
    header = ["class", "#gt", f"AP ({result.get('metric')})"] + [f"AP ({m})" for m in extra]
    rows = []
    for name, ap in result.get("per_class", {}).items():
        rows.append(
            [name, num_gt.get(name, ""), _fmt(ap)] + [_fmt(e.get("per_class", {}).get(name)) for e in extra.values()]
        )
    rows.append(["mAP", sum(num_gt.values()) if num_gt else "", _fmt(result.get("mAP"))])
    rows[-1] += [_fmt(e.get("mAP")) for e in extra.values()]
    return _table(header, rows)


def _errors_table(analysis: dict) -> str:
    from detkit.evaluation.analysis import ERROR_TYPES
    from detkit.visualize import ERROR_LABELS

    header = ["class"] + [ERROR_LABELS[t] for t in ERROR_TYPES]
    rows = [[n] + [c[t] for t in ERROR_TYPES] for n, c in analysis["errors_per_class"].items()]
    rows.append(["all"] + [analysis["errors"][t] for t in ERROR_TYPES])
    if "dAP" in analysis:
        rows.append(["mAP points gained by fixing"] + [f"{100 * analysis['dAP'][t]:.2f}" for t in ERROR_TYPES])
    return _table(header, rows)


def gallery_indices(num_records: int, num: int) -> List[int]:
    """``num`` record indices spread evenly over the dataset (all when it is smaller)."""
    if num <= 0 or num_records == 0:
        return []
    if num >= num_records:
        return list(range(num_records))
    return sorted({int(round(v)) for v in np.linspace(0, num_records - 1, num)})


def build_report(run_dir, out_html, gallery: int = 12, score_thresh: float = 0.5, overrides=()) -> Path:
    """Writes the run's HTML report (module docstring) to ``out_html``.

    Sections: summary (mAP), training curves (metrics.jsonl), per-class table (eval.json),
    PR curves and error analysis (detections.json scored against the config's test split),
    a gallery of ``gallery`` test images (detections with score >= ``score_thresh`` solid,
    ground truth dashed), and the config. A part whose files are missing says so in the page
    (a warning is logged); a folder that is not a run is a ``RunFolderError``."""
    from detkit.data.build import build_dataset
    from detkit.engine.analyze import analysis_figures, error_crops, gallery_images
    from detkit.evaluation.analysis import analyze_detections
    from detkit.evaluation.detfile import load_detections
    from detkit.schema import load_run_config

    run = check_run_dir(run_dir)
    name = run.resolve().name
    parts: List[str] = []
    notes: List[str] = []

    def note(msg: str) -> str:
        notes.append(msg)
        logger.warning("report: %s", msg)
        return f'<p class="note">{html.escape(msg)}</p>'

    result = None
    if (run / "eval.json").is_file():
        try:
            result = json.loads((run / "eval.json").read_text())
        except ValueError:
            note(f"{run / 'eval.json'} is not valid JSON")
    summary = ""
    if result is not None:
        summary = (
            f'<p class="big">{html.escape(str(result.get("metric")))} mAP <b>{_fmt(result.get("mAP"))}</b>'
            + "".join(
                f" &middot; {html.escape(m)} mAP {_fmt(e.get('mAP'))}" for m, e in result.get("extra", {}).items()
            )
            + "</p>"
        )

    # Training curves.
    parts.append("<h2>Training curves</h2>")
    metrics = None
    try:
        metrics = read_metrics(run)
        parts.append(_img(figure_png(training_curves_figure({name: metrics}, title=name)), "training curves"))
    except RunFolderError as exc:
        parts.append(note(str(exc)))
    minutes = [r["train_minutes"] for r in metrics or [] if "train_minutes" in r]
    if metrics and minutes:
        summary += (
            f'<p class="meta">training: {sum(minutes):.1f} min, {int(max(r["iter"] for r in metrics))} iterations</p>'
        )

    # Per-class table.
    parts.append("<h2>Per-class AP</h2>")
    parts.append(_per_class_table(result) if result is not None else note(f"no eval.json in {run}"))

    # PR curves, error analysis, gallery: detections.json against the config's test split.
    cfg = dataset = dets = None
    config_text = ""
    dataset_error = f"no config.yaml in {run}"
    if (run / "config.yaml").is_file():
        config_text = (run / "config.yaml").read_text(encoding="utf-8", errors="replace")
        try:
            cfg = load_run_config(str(run / "config.yaml"), list(overrides))
            if cfg.data.test is None:
                raise DetkitError("the config has no data.test dataset")
            dataset = build_dataset(cfg.data.test, cfg.data.classes, name="test")
        except DetkitError as exc:
            dataset, dataset_error = None, str(exc)
    parts.append("<h2>Precision / recall and errors</h2>")
    if dataset is None:
        parts.append(note(f"test dataset not available: {dataset_error}"))
    elif not (run / "detections.json").is_file():
        parts.append(note(f"no detections.json in {run}"))
    else:
        try:
            dets = load_detections(run / "detections.json", dataset)
        except DetkitError as exc:
            dets = None
            parts.append(note(str(exc)))
        if dets is not None:
            metric = cfg.test.metric if cfg is not None else "voc"
            analysis = analyze_detections(dataset, dets, metric, score_thresh=score_thresh)
            if metric not in ("voc", "voc07"):
                parts.append(
                    f"<p class=meta>The analysis uses VOC AP at IoU 0.5 ({analysis['metric']}); "
                    f"the run's metric is {html.escape(metric)}.</p>"
                )
            figs = analysis_figures(analysis, dataset.class_names)
            parts.append(_img(figure_png(figs["pr_curves"]), "PR curves"))
            parts.append(
                "<h3>Error breakdown</h3><p class=meta>Every false positive gets one type (Hoiem et al. 2012, "
                "TIDE 2020): localisation (right class, IoU 0.1-0.5), similar class (on an object of another "
                "class), duplicate (object already found), background (IoU &lt; 0.1); missed: objects no "
                "detection found. dAP: the mAP gained if all errors of the type were fixed.</p>"
            )
            parts.append(_errors_table(analysis))
            parts.append(_img(figure_png(figs["errors"]), "error breakdown"))
            parts.append(_img(figure_png(figs["confusion_matrix"]), "confusion matrix"))
            for key, title in (("false_positives", "Worst false positives"), ("missed", "Largest missed objects")):
                sheet = error_crops(analysis[key], dataset, 12)
                if sheet is not None:
                    parts.append(f"<h3>{title}</h3>" + _img(png_bytes(sheet), title))

    parts.append(
        f"<h2>Gallery</h2><p class=meta>detections with score &ge; {score_thresh:g} solid, ground truth dashed</p>"
    )
    if dataset is not None and dets is not None:
        shown = gallery_images(dataset, dets, gallery_indices(len(dataset.records), gallery), score_thresh)
        figs_html = "".join(
            f"<figure>{_img(png_bytes(im), cap, 'gallery-image')}<figcaption>{html.escape(cap)}</figcaption></figure>"
            for cap, im in shown
        )
        parts.append(f'<div class="gallery">{figs_html}</div>')
    else:
        parts.append(note("no gallery: needs detections.json and the test dataset"))

    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{html.escape(config_text)}</pre>" if config_text else note(f"no config.yaml in {run}"))

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>detkit report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>detkit run: {html.escape(name)}</h1>"
        f'<p class="meta">{html.escape(str(run.resolve()))} &middot; report written {now}</p>'
        + summary
        + "".join(parts)
        + "</body></html>\n"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out

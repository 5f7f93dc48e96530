"""``detkit report RUN_DIR --out report.html [--gallery N] [--score-thresh S]``

One self-contained HTML page about a run (images embedded, no server needed): mAP, training
curves, the per-class table, PR curves, the error breakdown with the worst false positives
and misses, a gallery of test images with detections against ground truth, and the config.
"""

from __future__ import annotations

import logging

from detkit.engine.report import build_report

NAME = "report"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="one self-contained HTML page about a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by detkit train")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--gallery", type=int, default=12, help="test images in the gallery (default 12)")
    p.add_argument(
        "--score-thresh", type=float, default=0.5, help="detections drawn and counted in the confusion matrix"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    path = build_report(args.run_dir, args.out, gallery=args.gallery, score_thresh=args.score_thresh)
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return 0

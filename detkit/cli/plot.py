"""``detkit plot RUN_DIR [RUN_DIR ...] --out PNG [--names NAME ...]``

Training curves from the runs' metrics.jsonl: every loss term, train vs validation loss,
learning rate and eval mAP against the iteration; several runs overlaid, named in the legend.
"""

from __future__ import annotations

import logging

from detkit.engine.report import plot_runs

NAME = "plot"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="training curves of one or several runs (PNG)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by detkit train")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--names", nargs="+", metavar="NAME", help="legend names, one per run (default: folder names)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = plot_runs(args.runs, args.out, args.names)
    logger.info("wrote %s", path)
    return 0

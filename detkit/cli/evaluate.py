"""``detkit evaluate --dataset DATA.yaml --detections DETS.json --metric voc07|voc|coco``

Scores a detection file (COCO-style results list, see the README) against a dataset.
"""

from __future__ import annotations

import logging

from detkit.cli.common import load_dataset_yaml
from detkit.data.build import build_dataset
from detkit.evaluation.detfile import load_detections
from detkit.evaluation.report import METRICS, evaluate, format_table, plot_pr_curves, write_result

NAME = "evaluate"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    ev = sub.add_parser(NAME, help="score a detection file against a dataset")
    ev.add_argument("--dataset", required=True, help="dataset YAML ({format: voc, root: ..., split: test})")
    ev.add_argument("--detections", required=True, help="COCO-style results JSON")
    ev.add_argument("--metric", default="voc07", choices=list(METRICS))
    ev.add_argument("--out", help="write the result JSON here")
    ev.add_argument("--plot", metavar="DIR", help="write per-class PR curves (PNG) here")
    ev.set_defaults(func=run)


def run(args) -> int:
    ds_cfg, classes = load_dataset_yaml(args.dataset)
    dataset = build_dataset(ds_cfg, classes)
    dets = load_detections(args.detections, dataset)
    result = evaluate(dataset, dets, args.metric)
    print(format_table(result))
    if args.out:
        write_result(result, args.out)
        logger.info("wrote %s", args.out)
    if args.plot:
        written = plot_pr_curves(result, args.plot)
        logger.info("wrote %d PR curves to %s", len(written), args.plot)
    return 0

"""``detkit data shapes|check``: dataset tools.

detkit data shapes --out DIR [--num-train N] [--num-test M] [--seed S] [--coco-json]
detkit data check DATA_OR_CONFIG.yaml [--split train|test] [--no-decode]
"""

from __future__ import annotations

import argparse
import sys

from detkit.cli.common import load_dataset_yaml
from detkit.data.build import build_dataset
from detkit.data.check import check_dataset, format_report
from detkit.data.shapes import generate_shapes
from detkit.errors import UsageError
from detkit.schema import ShapesConfig

NAME = "data"


def add_parser(sub) -> None:
    data = sub.add_parser(NAME, help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    defaults = ShapesConfig()  # one set of defaults for configs and the command line
    s = dsub.add_parser("shapes", help="generate the synthetic shapes dataset (VOC layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=defaults.num_train)
    s.add_argument("--num-test", type=int, default=defaults.num_test)
    s.add_argument("--seed", type=int, default=defaults.seed)
    s.add_argument("--coco-json", action="store_true", help="also write COCO json annotations")
    s.add_argument("--overwrite", action="store_true", help="regenerate our own files in --out")
    s.set_defaults(func=run_shapes)
    c = dsub.add_parser("check", help="validate a dataset and print statistics")
    c.add_argument("dataset", help="dataset YAML or full config")
    c.add_argument("--split", default="test", choices=["train", "test"], help="which split of a full config")
    c.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    c.set_defaults(func=run_check)
    data.set_defaults(func=lambda a: _help(data))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_shapes(args) -> int:
    try:
        out = generate_shapes(
            args.out,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            coco_json=args.coco_json,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    print(f"shapes dataset ready: {out} ({args.num_train} train, {args.num_test} test images)")
    return 0


def run_check(args) -> int:
    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split)
    dataset = build_dataset(ds_cfg, classes)
    report = check_dataset(dataset, decode_images=not args.no_decode, progress=sys.stderr.isatty())
    print(format_report(report))
    return 1 if report["errors"] else 0

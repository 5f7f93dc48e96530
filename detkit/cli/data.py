"""``detkit data shapes|check``: dataset tools.

detkit data shapes --out DIR [--num-train N] [--num-test M] [--seed S] [--coco-json] [--overwrite]
                   [--image-size MIN MAX] [--object-size MIN MAX] [--classes NAME ...] ...
detkit data check DATA_OR_CONFIG.yaml [--split train|test] [--no-decode]

The flags of ``shapes`` are made from the fields of ``detkit.schema.ShapesConfig`` (name,
help and default), so the command line, configs and ``generate_shapes`` share one set of
options and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Dict, List

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
    s = dsub.add_parser(
        "shapes",
        help="generate the synthetic shapes dataset (VOC layout)",
        description="Generate the synthetic shapes dataset as a VOC devkit folder. Ranges are MIN MAX.",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="folder to write the dataset to")
    _add_shapes_options(s)
    s.add_argument("--coco-json", action="store_true", help="also write COCO json annotations")
    s.add_argument("--overwrite", action="store_true", help="regenerate our own files in --out")
    s.set_defaults(func=run_shapes)
    c = dsub.add_parser("check", help="validate a dataset and print statistics")
    c.add_argument("dataset", help="dataset YAML or full config")
    c.add_argument("--split", default="test", choices=["train", "test"], help="which split of a full config")
    c.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    c.set_defaults(func=run_check)
    data.set_defaults(func=lambda a: _help(data))


def _add_shapes_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ShapesConfig field: --image-size MIN MAX for a [min, max] range, a list
    of names for classes, one value otherwise. Unset flags keep ShapesConfig's defaults."""
    hints = typing.get_type_hints(ShapesConfig)
    defaults = ShapesConfig()
    for f in dataclasses.fields(ShapesConfig):
        tp = hints[f.name]
        optional = type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = getattr(defaults, f.name)
        kw: Dict[str, Any] = {"dest": f"shapes_{f.name}", "default": None}
        shown = " ".join(str(v) for v in default) if isinstance(default, list) else default
        kw["help"] = f"{f.metadata.get('help', '')} (default: {'unset' if default is None else shown})"
        if typing.get_origin(tp) in (list, List):
            item = typing.get_args(tp)[0]
            if item is str:
                kw.update(nargs="+", metavar="NAME")
            else:
                kw.update(nargs=2, type=item, metavar=("MIN", "MAX"))
        else:
            kw.update(type=tp, metavar={int: "N", float: "X"}.get(tp, f.name.split("_")[-1].upper()))
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def shapes_options_from_args(args) -> ShapesConfig:
    """ShapesConfig with the fields given on the command line replaced (UsageError for bad
    values, naming the option)."""
    given = {
        f.name: getattr(args, f"shapes_{f.name}")
        for f in dataclasses.fields(ShapesConfig)
        if getattr(args, f"shapes_{f.name}", None) is not None
    }
    try:
        return ShapesConfig(**given)
    except ValueError as exc:
        # The checks name the field (max_iou); the user typed the flag (--max-iou).
        name = str(exc).split(" ", 1)[0]
        flag = f"--{name.replace('_', '-')}: " if name in given else ""
        raise UsageError(f"{flag}{exc}") from None


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_shapes(args) -> int:
    options = shapes_options_from_args(args)
    try:
        out = generate_shapes(args.out, options, coco_json=args.coco_json, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    print(f"shapes dataset ready: {out} ({options.num_train} train, {options.num_test} test images)")
    return 0


def run_check(args) -> int:
    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split)
    dataset = build_dataset(ds_cfg, classes)
    report = check_dataset(dataset, decode_images=not args.no_decode, progress=sys.stderr.isatty())
    print(format_report(report))
    return 1 if report["errors"] else 0

"""``detkit data shapes|check|browse``: dataset tools.

detkit data shapes --out DIR [--num-train N] [--num-test M] [--seed S] [--coco-json] [--overwrite]
                   [--image-size MIN MAX] [--object-size MIN MAX] [--classes NAME ...] ...
detkit data check DATA_OR_CONFIG.yaml [--split train|test|both] [--no-decode] [--plots DIR]
detkit data browse DATA_OR_CONFIG.yaml --out DIR [--num N] [--split train|test] [--seed S]

The flags of ``shapes`` are made from the fields of ``detkit.schema.ShapesConfig`` (name,
help and default), so the command line, configs and ``generate_shapes`` share one set of
options and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List

from detkit.cli.common import is_full_config, load_dataset_yaml, load_run_config
from detkit.config import load_yaml
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
    c.add_argument(
        "--split",
        default="both",
        choices=["train", "test", "both"],
        help="which split of a full config (default both: train, then test with train's class list, as training "
        "labels them; a bare dataset YAML is one split)",
    )
    c.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    c.add_argument(
        "--plots",
        metavar="DIR",
        help="also write histograms (objects per class, boxes per image, box sizes, aspect ratios) as PNGs; "
        "with a full config, in network-input pixels against the configured anchors (both splits: DIR/train, DIR/test)",
    )
    c.set_defaults(func=run_check)
    add_browse_parser(dsub)
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
    """Checks one split, or with a full config and ``--split both`` (the default) its train and
    its test split: a problem in the training data is what a user most needs to see before
    training. The test split gets the train split's class list, as training labels it.
    Returns 1 when any split has errors."""
    splits = [args.split]
    if args.split == "both":
        splits = ["test"]  # a bare dataset YAML: its one split
        if is_full_config(args.dataset):
            data = load_yaml(args.dataset)[0]["data"] or {}
            splits = [s for s in ("train", "test") if data.get(s)] or ["test"]
    classes, errors = None, False
    for i, split in enumerate(splits):
        ds_cfg, configured = load_dataset_yaml(args.dataset, which=split)
        dataset = build_dataset(ds_cfg, classes or configured)
        classes = dataset.class_names
        report = check_dataset(dataset, decode_images=not args.no_decode, progress=sys.stderr.isatty())
        print(("\n" if i else "") + format_report(report))
        if args.plots:
            write_check_plots(args.dataset, dataset, str(Path(args.plots) / split) if len(splits) > 1 else args.plots)
        errors = errors or bool(report["errors"])
    return 1 if errors else 0


# -- check --plots -------------------------------------------------------------------------
def write_check_plots(path: str, dataset, out_dir: str) -> None:
    """Histograms of ``dataset``; with a full run config, box sizes in network-input pixels
    (the config's test resize) against ``model.anchors``, and an anchor-fit line printed."""
    import numpy as np

    from detkit.data.stats import anchor_shapes, best_anchor_iou, box_stats
    from detkit.visualize import dataset_figures, save_figure

    anchor_sizes = anchor_ratios = None
    if is_full_config(path):
        cfg = load_run_config(path)
        stats = box_stats(dataset.records, cfg.data.input.min_size_test, cfg.data.input.max_size)
        a = cfg.model.anchors
        anchor_sizes = sorted({float(v) for level in a.sizes for v in level})
        anchor_ratios = sorted({float(v) for level in a.aspect_ratios for v in level})
        best = best_anchor_iou(stats.width, stats.height, anchor_shapes(a.sizes, a.aspect_ratios))
        if len(best):
            print(
                f"anchor fit ({stats.units}, shape IoU of each box with its best anchor, centred): "
                f"median {np.median(best):.2f}, {100 * np.mean(best < 0.5):.1f}% of boxes below 0.5"
            )
    else:
        stats = box_stats(dataset.records)
    figs = dataset_figures(
        dataset.class_names,
        stats.labels,
        stats.boxes_per_image,
        stats.sizes,
        stats.ratios,
        size_units=stats.units,
        anchor_sizes=anchor_sizes,
        anchor_ratios=anchor_ratios,
        title=dataset.name,
    )
    written = [save_figure(fig, Path(out_dir) / f"{name}.png") for name, fig in figs.items()]
    print(f"wrote {len(written)} plots to {out_dir}: {', '.join(p.name for p in written)}")


# -- browse --------------------------------------------------------------------------------
def add_browse_parser(dsub) -> None:
    b = dsub.add_parser("browse", help="draw the ground truth of some images and a contact sheet")
    b.add_argument("dataset", help="dataset YAML or full config")
    b.add_argument("--out", required=True, help="folder for <id>_gt.png files and contact_sheet.png")
    b.add_argument("--num", type=int, default=16, help="images to draw (default 16; 0: all)")
    b.add_argument("--split", default="test", choices=["train", "test"], help="which split of a full config")
    b.add_argument("--seed", type=int, default=0, help="which images: a seeded random sample (default 0)")
    b.set_defaults(func=run_browse)


def run_browse(args) -> int:
    """Draws the ground truth (class colours, difficult boxes dashed) of ``--num`` images,
    each to OUT/<id>_gt.png, and all of them on OUT/contact_sheet.png."""
    import logging

    import numpy as np

    from detkit.data.io import read_image_array
    from detkit.errors import ImageReadError
    from detkit.visualize import class_color, contact_sheet, draw_ground_truth, save_rgb

    logger = logging.getLogger("detkit")
    if args.num < 0:
        raise UsageError(f"--num must be >= 0, got {args.num}")
    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split)
    dataset = build_dataset(ds_cfg, classes)
    records = dataset.records
    if not records:
        raise UsageError(f"{args.dataset}: the dataset has no images")
    n = len(records) if args.num == 0 else min(args.num, len(records))
    pick = np.sort(np.random.default_rng(args.seed).choice(len(records), n, replace=False))
    out = Path(args.out)
    inputs = {Path(r.file_name).resolve() for r in records}
    out.mkdir(parents=True, exist_ok=True)
    tiles, titles, failed = [], [], 0
    for i in pick:
        rec = records[i]
        try:
            image = read_image_array(rec.file_name)
        except ImageReadError as exc:
            logger.error("skipped %s", exc)
            failed += 1
            continue
        drawn = draw_ground_truth(image, rec.boxes, rec.labels, dataset.class_names, rec.difficult)
        target = out / f"{rec.image_id}_gt.png"
        if target.resolve() in inputs:  # never overwrite the dataset's own images
            raise UsageError(f"{target} is an image of the dataset; choose another --out")
        save_rgb(target, drawn)
        tiles.append(drawn)
        ndiff = int(rec.difficult.sum())
        titles.append(f"{rec.image_id} ({len(rec.boxes)}{f', {ndiff} difficult' if ndiff else ''})")
    if tiles:
        legend = [(name, class_color(k)) for k, name in enumerate(dataset.class_names, start=1)]
        save_rgb(out / "contact_sheet.png", contact_sheet(tiles, titles, legend=legend))
    print(f"drew {len(tiles)} of {len(records)} images of {dataset.name} to {out} (contact_sheet.png)")
    return 1 if failed else 0

"""``detkit compare DATA.yaml --out DIR [--recipe shapes|bccd] [--backbone NAME] [--iters N]
[--stages KEY,KEY] [--proposals TRAIN.npz TEST.npz] [--workers N] [--time-images N]
[--svd fc6=R,fc7=R] [--no-progress] [key=value ...]``

Trains (or loads from earlier runs in DIR, resuming unfinished ones) every stage of the
lineage on the dataset config's data, with one backbone and one set of Selective Search
proposals, and writes DIR/compare.md (the table and the papers' relationships),
DIR/compare.json and DIR/compare.png (mAP against test s/img, log axis). Each stage is
``detkit train DIR/configs/<stage>.yaml`` into ``DIR/<stage>/``; the SVD variants compress the
trained Fast / Faster R-CNN models (``detkit compress``). A stage whose config does not exist
yet is listed as pending, a stage that fails as failed with its reason; the others go on.
See ``detkit.engine.compare``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from detkit.cli import train
from detkit.engine.compare import RECIPES, STAGE_KEYS, CompareJob, Comparison
from detkit.engine.inference import denormals_flushed
from detkit.errors import UsageError

NAME = "compare"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    c = sub.add_parser(
        NAME,
        help="train and measure every stage of the lineage on one dataset (table, JSON, plot)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("data", metavar="DATA.yaml", help="dataset config: a YAML with data.train and data.test")
    c.add_argument("--out", required=True, help="comparison folder (reused: finished stages are loaded)")
    c.add_argument("--recipe", choices=sorted(RECIPES), default="shapes", help="which base configs (default shapes)")
    c.add_argument("--backbone", help="backbone name for every stage (default: the recipe's)")
    c.add_argument("--iters", type=int, help="SGD iterations of every stage (schedules scaled; default: the recipes')")
    c.add_argument("--stages", default=",".join(STAGE_KEYS), help=f"comma-separated subset of {','.join(STAGE_KEYS)}")
    c.add_argument(
        "--proposals", nargs=2, metavar=("TRAIN", "TEST"), help="Selective Search files to use (default: computed)"
    )
    c.add_argument("--workers", type=int, default=2, help="Selective Search processes (default 2)")
    c.add_argument("--time-images", type=int, default=20, help="test images timed per stage (default 20)")
    c.add_argument("--svd", metavar="fc6=R,fc7=R", help="SVD ranks (default: the paper's 1/4 of fc6, 1/16 of fc7)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every stage")
    c.set_defaults(func=run)


def parse_svd(text):
    if not text:
        return None
    ranks = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--svd {text}: expected NAME=RANK[,NAME=RANK], e.g. fc6=64,fc7=16")
        ranks[name.strip()] = int(value)
    return ranks


def train_run(config: Path, out: Path, resume: bool, progress: bool = True) -> None:
    """``detkit train CONFIG --out OUT [--resume]``, in this process."""
    args = argparse.Namespace(config=str(config), out=str(out), resume=resume, no_progress=not progress, overrides=[])
    train.run(args)


def run(args) -> int:
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.time_images < 0:
        raise UsageError(f"--time-images must be >= 0, got {args.time_images}")
    job = CompareJob(
        data=args.data,
        out=args.out,
        recipe=args.recipe,
        backbone=args.backbone,
        iters=args.iters,
        stages=[s.strip() for s in args.stages.split(",") if s.strip()],
        proposals=args.proposals,
        workers=args.workers,
        time_images=args.time_images,
        svd=parse_svd(args.svd),
        overrides=list(args.overrides),
        progress=not args.no_progress,
    )
    progress = job.progress
    comparison = Comparison(job, lambda config, out, resume: train_run(config, out, resume, progress))
    with denormals_flushed(True):
        comparison.run()
    paths = comparison.write()
    print(paths["md"].read_text(encoding="utf-8"))
    logger.info("wrote %s, %s, %s", paths["md"], paths["json"], paths["png"])
    return 0

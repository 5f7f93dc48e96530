"""``detkit proposals``: proposal files for a dataset, their recall, and recall plots.

    detkit proposals DATA_OR_CONFIG.yaml --out ss.npz [--method selective_search] [--mode fast]
                     [--workers N] [--limit N] [--split test|train] [--max-proposals 2000]
                     [--eval] [--plot recall.png [--compare rpn.npz ...]] [--overwrite | --reuse]
    detkit proposals CONFIG_OR_DATA.yaml --method rpn --checkpoint model_final.pt --out rpn.npz

- Selective Search runs on each original image in ``--workers`` processes; ``--method rpn``
  dumps the RPN proposals of a trained checkpoint in original pixels, so that the two are
  comparable (``--compare``). See ``detkit.engine.proposals``.
- Resumable: finished images go to ``<out>.partial/``; a rerun with the same settings
  computes only the missing ones. An existing ``--out`` is never replaced without
  ``--overwrite``; ``--reuse`` evaluates / plots it as it is.
- Under torchrun (``torchrun --nproc_per_node=N -m detkit proposals ...``, also across
  machines) each process computes its share of the images (with ``--workers`` processes
  each, for Selective Search) and rank 0 writes the chunks and the file; ``--workers``
  alone is the way on one machine.
- ``--eval``: recall at IoU 0.5 and 0.7 and AR (IoU 0.5:0.95) of the top 100/300/1000/2000
  proposals against the non-difficult ground truth; printed and written to
  ``<out stem>.recall.json``. ``--plot PNG``: recall against the number of proposals (log
  x), one curve per file, the Faster R-CNN paper's Selective-Search-vs-RPN comparison.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from detkit.cli.common import is_full_config, load_dataset_yaml, load_run_config
from detkit.data.build import build_dataset
from detkit.data.proposal_files import load_proposals
from detkit.engine import distributed
from detkit.engine.inference import device_from_config
from detkit.engine.proposals import (
    METHODS,
    ProposalJob,
    compute_proposals,
    evaluate_proposal_files,
    load_rpn_model,
    recall_path,
)
from detkit.errors import ProposalFileError, UsageError
from detkit.modeling.proposals.selective_search import MODES

NAME = "proposals"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="compute proposal files (Selective Search or a trained RPN), evaluate recall, plot",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATA_OR_CONFIG", help="dataset YAML or full config (its data.<split>)")
    p.add_argument("--out", required=True, help="proposal file to write (.npz or .json)")
    p.add_argument("--method", choices=METHODS, default="selective_search")
    p.add_argument("--mode", choices=MODES, default="fast", help="Selective Search strategy set (default: fast)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split of a full config")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--workers", type=int, default=1, help="processes for Selective Search (default 1)")
    p.add_argument("--max-proposals", type=int, default=2000, help="proposals kept per image (default 2000)")
    p.add_argument(
        "--min-size",
        type=float,
        default=20.0,
        help="Selective Search: drop boxes narrower/lower than this, original pixels (default 20)",
    )
    p.add_argument("--seed", type=int, default=0, help="Selective Search ranking seed")
    p.add_argument("--checkpoint", help="--method rpn: the trained detector")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="--method rpn")
    p.add_argument("--eval", action="store_true", help="print recall / AR and write <out stem>.recall.json")
    p.add_argument("--plot", metavar="PNG", help="draw recall against the number of proposals")
    p.add_argument(
        "--compare", nargs="+", default=[], metavar="FILE", help="other proposal files to evaluate / plot beside --out"
    )
    p.add_argument("--overwrite", action="store_true", help="recompute and replace an existing --out")
    p.add_argument("--reuse", action="store_true", help="use an existing --out as it is (only --eval / --plot)")
    p.add_argument("--flush-every", type=int, default=20, help="images per partial chunk (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--dist-timeout-min",
        type=float,
        default=30.0,
        help="under torchrun: minutes a process waits for the others before it stops (default 30)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of a full config (as detkit train)")
    p.set_defaults(func=run)


def check_args(args) -> Path:
    out = Path(args.out)
    if out.suffix.lower() not in (".npz", ".json"):
        raise UsageError(f"--out {out}: use a .npz or .json file name")
    for name in ("limit", "workers", "max_proposals", "flush_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.method == "rpn" and not args.checkpoint and not args.reuse:
        raise UsageError("--method rpn needs --checkpoint")
    if args.checkpoint and args.method != "rpn":
        raise UsageError("--checkpoint is only used with --method rpn")
    if args.checkpoint and not args.reuse and not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.dist_timeout_min <= 0:
        raise UsageError(f"--dist-timeout-min must be > 0, got {args.dist_timeout_min}")
    if args.overwrite and args.reuse:
        raise UsageError("--overwrite and --reuse contradict each other")
    if args.compare and not (args.eval or args.plot):
        raise UsageError("--compare needs --eval or --plot")
    if out.exists() and not (args.overwrite or args.reuse):
        raise UsageError(f"{out} exists; pass --overwrite to recompute it or --reuse to evaluate/plot it as is")
    if args.reuse and not out.is_file():
        raise UsageError(f"--reuse: {out} does not exist")
    for other in args.compare:
        if not Path(other).is_file():
            raise UsageError(f"--compare: proposal file not found: {other}")
    return out


def _dataset_settings(ds_cfg) -> dict:
    keys = ("format", "root", "split", "ann_dir", "img_dir", "split_file", "ann_file", "holdout", "seed")
    return {k: getattr(ds_cfg, k) for k in keys if getattr(ds_cfg, k, None) is not None}


def run(args) -> int:
    with distributed.failures_reported():
        return _run(args)


def _run(args) -> int:
    device = device_from_config(args.device, key="--device") if args.method == "rpn" else None
    # Only numpy results travel between the processes: gloo serves them on any machine.
    device = distributed.init_distributed("gloo", device, args.dist_timeout_min)
    out = distributed.on_main(lambda: check_args(args), "checking the arguments")
    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split, overrides=args.overrides)
    full_config = is_full_config(args.dataset)
    with distributed.quiet_unless_main():
        dataset = distributed.main_first(lambda: build_dataset(ds_cfg, classes), "loading the dataset")
    records = dataset.records[: args.limit] if args.limit else list(dataset.records)
    if not records:
        raise UsageError(f"{args.dataset}: the dataset has no images")

    if args.reuse:
        if not distributed.is_main():
            return 0
        table, meta = load_proposals(out)
        kept = [r for r in records if str(r.image_id) in table]
        if len(kept) < len(records):
            logger.info("%s covers %d of the %d images selected: evaluating those", out, len(kept), len(records))
        records = kept
        if not records:
            raise ProposalFileError(f"proposal file {out} has no proposals for any image of {dataset.name}")
    else:
        job = ProposalJob(
            method=args.method,
            mode=args.mode,
            max_proposals=args.max_proposals,
            min_size=args.min_size,
            seed=args.seed,
            workers=args.workers,
            flush_every=args.flush_every,
            progress=not args.no_progress and distributed.is_main(),
            checkpoint=args.checkpoint,
            config=args.dataset if full_config else None,
            dataset_settings=_dataset_settings(ds_cfg),
        )
        rpn_model = None
        if args.method == "rpn":
            cfg = load_run_config(args.dataset, args.overrides) if full_config else None
            rpn_model = load_rpn_model(args.checkpoint, cfg, device, args.max_proposals)
        table, meta = compute_proposals(out, dataset, records, job, overwrite=args.overwrite, rpn_model=rpn_model)
        if not distributed.is_main():  # rank 0 wrote the file and evaluates it
            return 0

    if args.eval or args.plot:
        files = [(out, table, meta)] + [(Path(o), *load_proposals(o)) for o in args.compare]
        evaluate_proposal_files(
            files,
            records,
            recall_json=recall_path(out) if args.eval else None,
            plot=Path(args.plot) if args.plot else None,
        )
    return 0

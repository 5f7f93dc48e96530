"""``detkit eval CONFIG --checkpoint CKPT [--out DIR] [--plot] [--analyze] [key=value ...]``

Runs a checkpoint over the config's test split and scores it with the config's metric(s);
writes eval.json and detections.json (and PR curves with ``--plot``). ``--analyze`` adds
the error analysis in DIR/analysis/ (``detkit.engine.analyze``): PR curves, a confusion
matrix with background, the error breakdown (Hoiem et al. 2012 / TIDE) with the mAP gained
by fixing each error type, and the worst false positives and misses as image crops.

Under torchrun (``torchrun --nproc_per_node=N -m detkit eval ...``) the test images are
shared out across the N processes and the detections gathered on rank 0, which scores and
writes them: the same detections and mAP as one process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from detkit.cli.common import load_run_config
from detkit.data.build import build_dataset, dataset_transforms
from detkit.engine import distributed
from detkit.engine.analyze import write_analysis
from detkit.engine.evaluate import evaluate_detections, summary_lines, write_evaluation
from detkit.engine.inference import amp_dtype, denormals_flushed, device_from_config, run_inference
from detkit.engine.predictor import model_from_checkpoint
from detkit.engine.proposals import check_proposal_files
from detkit.errors import UsageError
from detkit.evaluation.analysis import analyze_detections, format_errors

NAME = "eval"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    e = sub.add_parser(NAME, help="evaluate a checkpoint on the config's test set")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", help="output folder (default: <checkpoint folder>/eval)")
    e.add_argument("--plot", action="store_true", help="also write per-class PR curves")
    e.add_argument(
        "--analyze",
        action="store_true",
        help="also write the error analysis (PR curves, confusion matrix, error types, worst errors) to OUT/analysis",
    )
    e.add_argument(
        "--analyze-score",
        type=float,
        default=0.5,
        metavar="S",
        help="score threshold of the confusion matrix (default 0.5, as the demo draws)",
    )
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.set_defaults(func=run)


def run(args) -> int:
    cfg = load_run_config(args.config, args.overrides)
    # Before any tensor work, so that torch's thread pool inherits the mode (see denormals_flushed).
    with denormals_flushed(cfg.train.flush_denormal), distributed.failures_reported():
        return _run(args, cfg)


def _run(args, cfg) -> int:
    device = device_from_config(cfg.train.device)
    # Under torchrun every rank runs its share of the test images; rank 0 scores and writes.
    device = distributed.init_distributed(cfg.train.dist_backend, device, cfg.train.dist_timeout_min)
    if cfg.train.num_threads > 0:  # as in training (float rounding depends on the thread count)
        torch.set_num_threads(cfg.train.num_threads)
    model, cfg, classes = model_from_checkpoint(args.checkpoint, cfg, device)
    check_proposal_files(cfg, args.config)
    if device.type == "cuda" and cfg.model.channels_last_inference:
        model.to(memory_format=torch.channels_last)  # weights as the inputs: tensor-core convolutions
    if cfg.data.test is None:
        raise UsageError(f"{args.config}: no data.test dataset to evaluate on")
    transforms = dataset_transforms(cfg.data.input, False)
    with distributed.quiet_unless_main():
        dataset = distributed.main_first(
            lambda: build_dataset(cfg.data.test, classes, transforms, name="test"), "loading the dataset"
        )
    dets, _, sec = run_inference(
        model,
        dataset,
        cfg.data.test_batch_size,
        device,
        cfg.data.num_workers,
        amp=amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype),
        progress=not args.no_progress and distributed.is_main(),
        sharded=True,
    )
    if not distributed.is_main():
        return 0
    result = evaluate_detections(cfg.test, dets, dataset)
    result["s_per_img"] = sec
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    write_evaluation(result, dets, dataset, out, plot=args.plot)
    print(summary_lines(result))
    if args.analyze:
        analysis = analyze_detections(dataset, dets, cfg.test.metric, score_thresh=args.analyze_score)
        write_analysis(analysis, dataset, out / "analysis")
        print(format_errors(analysis))
        logger.info("error analysis in %s", out / "analysis")
    logger.info("%.3f s/img; results in %s", sec, out)
    return 0

"""``detkit compress CKPT --fc6 RANK --fc7 RANK --out CKPT2 [--layer NAME=RANK ...] [--config CFG]
[--no-eval] [--time-images N] [--overwrite]``

Truncated-SVD compression of the RoI head's fully connected layers (Fast R-CNN sec. 3.1; the
paper keeps the top 1024 singular values of fc6 and 256 of fc7: 30 % less detection time for
0.3 mAP points). Writes CKPT2, whose stored config has ``model.roi_head.svd``, so that
``detkit eval`` / ``detkit demo`` load it with no extra flag; the original checkpoint is
never touched (``--out`` must be another file; an existing ``--out`` is only replaced with
``--overwrite``). Then reports, before and after: the parameters of each compressed layer and
of the model, test seconds per image (RoI head and total, measured on the first
``--time-images`` test images with both models taking turns) and the mAP on the config's
test split (``--no-eval`` skips it). The report is printed and written to
``<CKPT2 stem>.compress.json``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from detkit.cli.common import load_run_config
from detkit.data.build import build_dataset, dataset_transforms
from detkit.engine.checkpoint import atomic_write_text
from detkit.engine.compress import compress_model, parse_ranks, save_compressed
from detkit.engine.evaluate import evaluate_detections
from detkit.engine.inference import denormals_flushed, device_from_config, run_inference
from detkit.engine.predictor import model_from_checkpoint
from detkit.engine.profile import count_parameters, profile_detectors
from detkit.errors import UsageError

NAME = "compress"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    c = sub.add_parser(NAME, help="SVD-compress the RoI head's fc layers of a checkpoint (Fast R-CNN sec. 3.1)")
    c.add_argument("checkpoint", metavar="CKPT")
    c.add_argument("--fc6", type=int, metavar="RANK", help="singular values kept of fc6 (paper: 1024 of 4096)")
    c.add_argument("--fc7", type=int, metavar="RANK", help="singular values kept of fc7 (paper: 256 of 4096)")
    c.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="NAME=RANK",
        help="any fully connected layer of the box head by name (repeatable)",
    )
    c.add_argument("--out", required=True, metavar="CKPT2", help="the compressed checkpoint to write")
    c.add_argument("--config", help="config to use instead of the one stored in CKPT (e.g. other data paths)")
    c.add_argument("--no-eval", action="store_true", help="skip the mAP before / after")
    c.add_argument(
        "--time-images", type=int, default=50, metavar="N", help="test images timed (default 50; 0: no timing)"
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out (never CKPT itself)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=run)


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".compress.json")


def check_paths(ckpt: Path, out: Path, overwrite: bool) -> None:
    if not ckpt.is_file():
        raise UsageError(f"checkpoint not found: {ckpt}")
    if out.resolve() == ckpt.resolve() or (out.exists() and out.samefile(ckpt)):
        raise UsageError(f"--out {out} is the checkpoint itself (the original is never overwritten): choose another")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")


def run(args) -> int:
    ranks = parse_ranks(args.fc6, args.fc7, args.layer)  # bad ranks fail before anything loads
    ckpt, out = Path(args.checkpoint), Path(args.out)
    check_paths(ckpt, out, args.overwrite)
    if args.time_images < 0:
        raise UsageError(f"--time-images must be >= 0, got {args.time_images}")
    cfg = load_run_config(args.config) if args.config else None
    flush = cfg.train.flush_denormal if cfg is not None else True
    with denormals_flushed(flush):
        return _run(args, ckpt, out, ranks, cfg)


def _run(args, ckpt: Path, out: Path, ranks: Dict[str, int], cfg) -> int:
    device = device_from_config(cfg.train.device if cfg is not None else "auto")
    model, cfg, classes = model_from_checkpoint(ckpt, cfg, device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    original = copy.deepcopy(model)
    layers = compress_model(model, cfg, ranks, source=str(ckpt))  # bad layers / ranks fail first
    dataset = None
    measure = args.time_images > 0 or not args.no_eval
    if measure and cfg.data.test is not None:
        # loaded before anything is written: a missing test set fails before the file is
        dataset = build_dataset(cfg.data.test, classes, dataset_transforms(cfg.data.input, False), name="test")
    elif measure:
        logger.info("the config has no data.test: no timing and no mAP")
    save_compressed(model, cfg, classes, out, source=str(ckpt))
    logger.info("wrote %s", out)

    report: Dict = {
        "checkpoint": str(ckpt),
        "compressed": str(out),
        "layers": layers,
        "model_params": {"before": count_parameters(original), "after": count_parameters(model)},
    }
    if dataset is not None and args.time_images > 0:
        amp = cfg.train.amp and device.type == "cuda"
        entries = {"before": (original, dataset), "after": (model, dataset)}
        times = profile_detectors(entries, args.time_images, device, amp)
        report["s_per_img"] = times
    if dataset is not None and not args.no_eval:
        report["mAP"] = {}
        for name, m in (("before", original), ("after", model)):
            dets, _, _ = run_inference(
                m, dataset, cfg.data.test_batch_size, device, cfg.data.num_workers, progress=not args.no_progress
            )
            result = evaluate_detections(cfg.test, dets, dataset)
            maps = {result["metric"]: result["mAP"]}
            maps.update({k: v["mAP"] for k, v in result.get("extra", {}).items()})
            report["mAP"][name] = maps
    path = report_path(out)
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    logger.info("report: %s", path)
    return 0


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f} %" if before else "n/a"


def format_report(report: Dict) -> str:
    lines = ["layer  shape            rank   params before   params after"]
    for name, e in report["layers"].items():
        shape = f"{e['shape'][0]} x {e['shape'][1]}"
        lines.append(f"{name:<6} {shape:<16} {e['rank']:<6} {e['params_before']:>13,} {e['params_after']:>14,}")
    p = report["model_params"]
    lines.append(f"model parameters: {p['before']:,} -> {p['after']:,} ({_change(p['before'], p['after'])})")
    times: Optional[Dict] = report.get("s_per_img")
    if times:
        b, a = times["before"], times["after"]
        lines.append(f"timed on {b['images']} test images (s/img)    before      after   change")
        for key, label in (("head", "RoI head"), ("total", "total")):
            lines.append(f"  {label:<32} {b[key]:>9.4f} {a[key]:>10.4f}   {_change(b[key], a[key])}")
    maps = report.get("mAP")
    if maps:
        for metric in maps["before"]:
            b, a = maps["before"][metric], maps["after"][metric]
            if b is None or a is None:
                continue
            lines.append(f"mAP {metric:<6} {b:.4f} -> {a:.4f} ({100 * (a - b):+.2f} points)")
    return "\n".join(lines)

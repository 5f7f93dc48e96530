"""The ``detkit`` command line (also ``python -m detkit``).

    detkit train CONFIG [--out DIR] [--resume] [key=value ...]
    detkit eval CONFIG --checkpoint CKPT [--out DIR] [key=value ...]
    detkit demo --config CONFIG --checkpoint CKPT INPUT... --out DIR
    detkit evaluate --dataset DATA.yaml --detections DETS.json --metric voc07|voc|coco
    detkit data shapes --out DIR --num-train N --num-test M --seed S
    detkit data check DATA.yaml
    detkit convert --from torchvision SRC.pth --out CKPT
    detkit proposals DATA_OR_CONFIG.yaml --method selective_search|rpn --out FILE [--eval] ...

Errors a user can fix (bad config, dataset, checkpoint, input) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("detkit")


class CLIError(Exception):
    """A user error found by the CLI itself."""


def _user_errors():
    """Exception types whose message is the whole story for the user."""
    from detkit.config import ConfigError
    from detkit.data.dataset import DatasetError
    from detkit.data.io import ImageReadError
    from detkit.engine.checkpoint import CheckpointError
    from detkit.engine.trainer import TrainingError
    from detkit.evaluation.detfile import DetectionFileError
    from detkit.modeling.backbones.common import BackboneError

    errors = [CLIError, ConfigError, DatasetError, ImageReadError, CheckpointError, TrainingError,
              DetectionFileError, BackboneError]
    try:
        from detkit.modeling.proposals.precomputed import ProposalFileError

        errors.append(ProposalFileError)
    except ImportError:
        pass
    return tuple(errors)


def _setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "%(message)s"))

    class _Prefix(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.WARNING and not verbose:
                record.msg = f"warning: {record.msg}"
            return True

    handler.addFilter(_Prefix())
    root = logging.getLogger("detkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# -- config helpers ---------------------------------------------------------------------------
def load_run_config(path: str, overrides: List[str]):
    from detkit.config import load_config
    from detkit.schema import Config

    if not os.path.isfile(path):
        raise CLIError(f"config file not found: {path}")
    return load_config(path, Config, overrides)


def load_dataset_yaml(path: str, which: str = "test"):
    """A dataset YAML ({format: voc, root: ..., split: ...}) or a full config (its data.<which>)."""
    from detkit.config import from_dict, load_yaml
    from detkit.schema import Config, DatasetConfig

    if not os.path.isfile(path):
        raise CLIError(f"dataset file not found: {path}")
    data, origins = load_yaml(path)
    if isinstance(data, dict) and "data" in data:
        cfg = from_dict(Config, data, origins)
        ds = getattr(cfg.data, which) or cfg.data.test or cfg.data.train
        if ds is None:
            raise CLIError(f"{path}: the config has no data.{which} dataset")
        return ds, cfg.data.classes
    return from_dict(DatasetConfig, data, origins), None


def _default_out(config_path: str, resume: bool = False) -> Path:
    """work_dirs/<config name>, or the first free work_dirs/<config name>_N: a default
    folder never overwrites an earlier run. With ``resume``: the newest of those folders
    that holds a run (so ``detkit train CFG --resume`` continues where the last run stopped)."""
    from detkit.engine.trainer import RUN_FILES

    base = Path("work_dirs") / Path(config_path).stem
    holds_run = lambda p: p.exists() and any((p / f).exists() for f in RUN_FILES)  # noqa: E731
    candidate, n, last = base, 1, None
    while holds_run(candidate):
        last = candidate
        candidate = Path(f"{base}_{n}")
        n += 1
    return last if resume and last is not None else candidate


def _evaluate_fn(cfg):
    from detkit.evaluation.report import evaluate, result_to_json

    def run(dets, dataset):
        result = evaluate(dataset, dets, cfg.test.metric)
        extra = {}
        for metric in cfg.test.extra_metrics:
            if metric != cfg.test.metric:
                r = evaluate(dataset, dets, metric)
                extra[metric] = result_to_json({"mAP": r["mAP"], "per_class": r["per_class"]})
        if extra:
            result["extra"] = extra
        return result

    return run


def _finish_eval(result, dataset, out_dir: Path, plot: bool = False) -> None:
    from detkit.evaluation.detfile import save_detections
    from detkit.evaluation.report import format_table, plot_pr_curves, write_result

    dets = result.pop("dets", None)
    if dets is not None:
        save_detections(out_dir / "detections.json", dets, dataset)
    write_result(result, out_dir / "eval.json")
    print(format_table(result))
    for metric, r in result.get("extra", {}).items():
        print(f"{metric}: mAP {r['mAP']:.4f}" if r["mAP"] is not None else f"{metric}: mAP n/a")
    if plot:
        plot_pr_curves(result, out_dir / "pr_curves")


# -- commands ---------------------------------------------------------------------------------
def _save_run_config(cfg, out: Path, resume: bool) -> None:
    """config.yaml of a run is written once; a resume with another config keeps it and
    saves the new one beside it (config_resume_<time>.yaml)."""
    import time

    from detkit.config import dump_config

    path = out / "config.yaml"
    if not (resume and path.exists()):
        dump_config(cfg, path)
        return
    candidate = out / f"config_resume_{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    dump_config(cfg, candidate)
    if candidate.read_bytes() == path.read_bytes():
        candidate.unlink()
    else:
        logger.info("resuming with a changed config: saved as %s", candidate.name)


def cmd_train(args) -> int:
    import torch

    from detkit.build import build_datasets, build_model, model_summary
    from detkit.engine.trainer import Trainer, check_output_dir

    cfg = load_run_config(args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out(args.config, args.resume)
    check_output_dir(out, args.resume)
    train_set, test_set, classes = build_datasets(cfg, need_train=True, need_test=cfg.data.test is not None)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the seeded run
    model = build_model(cfg.model, len(classes), cfg.data.input)
    out.mkdir(parents=True, exist_ok=True)
    cfg.data.classes = list(classes)
    _save_run_config(cfg, out, args.resume)
    logger.info("train: %d images, %s; test: %s images; classes: %s", len(train_set), cfg.data.train.format,
                len(test_set) if test_set else 0, ", ".join(classes))
    logger.info("model: %s; output: %s", model_summary(model), out)
    trainer = Trainer(cfg, model, train_set, test_set, out, classes, _evaluate_fn(cfg), resume=args.resume,
                      progress=not args.no_progress)
    result = trainer.train()
    if result is not None:
        _finish_eval(result, test_set, out)
    logger.info("done: %s", out)
    return 0


def cmd_eval(args) -> int:
    from detkit.build import build_dataset, dataset_transforms
    from detkit.engine.inference import device_from_config, run_inference
    from detkit.engine.predictor import model_from_checkpoint

    cfg = load_run_config(args.config, args.overrides)
    device = device_from_config(cfg.train.device)
    model, cfg, classes = model_from_checkpoint(args.checkpoint, cfg, device)
    if cfg.data.test is None:
        raise CLIError(f"{args.config}: no data.test dataset to evaluate on")
    dataset = build_dataset(cfg.data.test, classes, dataset_transforms(cfg.data.input, False), name="test")
    dets, _, sec = run_inference(model, dataset, cfg.data.test_batch_size, device, cfg.data.num_workers,
                                 amp=cfg.train.amp and device.type == "cuda", progress=not args.no_progress)
    result = _evaluate_fn(cfg)(dets, dataset)
    result["s_per_img"] = sec
    result["dets"] = dets
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _finish_eval(result, dataset, out, plot=args.plot)
    logger.info("%.3f s/img; results in %s", sec, out)
    return 0


def expand_inputs(inputs: List[str]) -> List[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given."""
    from detkit.data.io import IMAGE_EXTENSIONS

    paths: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                logger.warning("no file matches %s", item)
            paths += [Path(m) for m in matches if Path(m).is_file()]
        else:
            paths.append(p)
    return paths


def cmd_demo(args) -> int:
    from detkit.data.io import ImageReadError, read_image_array
    from detkit.engine.predictor import Predictor
    from detkit.visualize import draw_detections, save_rgb

    cfg = load_run_config(args.config, args.overrides) if args.config else None
    predictor = Predictor.from_checkpoint(args.checkpoint, cfg)
    predictor.model.roi_head.score_thresh = args.score_thresh
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise CLIError("no input images")
    failed, stems = 0, {}
    for path in paths:
        try:
            image = read_image_array(path)
        except ImageReadError as exc:
            logger.error("skipped %s: %s", path, exc)
            failed += 1
            continue
        det = predictor(image)
        stem = path.stem
        if stem in stems:  # same name in two folders: keep both outputs
            stems[stem] += 1
            stem = f"{stem}_{stems[stem]}"
        else:
            stems[stem] = 0
        boxes, scores, labels = det.boxes.numpy(), det.scores.numpy(), det.labels.numpy()
        record = {
            "image": str(path),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "detections": [
                {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                 "label": int(lab), "class": predictor.class_names[int(lab) - 1]}
                for b, s, lab in zip(boxes, scores, labels)
            ],
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        save_rgb(out / f"{stem}.png", draw_detections(image, boxes, scores, labels, predictor.class_names))
        logger.info("%s: %d detection%s", path, len(boxes), "" if len(boxes) == 1 else "s")
    logger.info("wrote %d results to %s", len(paths) - failed, out)
    return 1 if failed else 0


def cmd_evaluate(args) -> int:
    from detkit.build import build_dataset
    from detkit.evaluation.detfile import load_detections
    from detkit.evaluation.report import evaluate, format_table, plot_pr_curves, write_result

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


def cmd_data_shapes(args) -> int:
    from detkit.data.shapes import generate_shapes

    try:
        out = generate_shapes(args.out, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
                              coco_json=args.coco_json, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise CLIError(str(exc)) from None
    print(f"shapes dataset ready: {out} ({args.num_train} train, {args.num_test} test images)")
    return 0


def cmd_data_check(args) -> int:
    from detkit.build import build_dataset
    from detkit.data.check import check_dataset, format_report

    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split)
    dataset = build_dataset(ds_cfg, classes)
    report = check_dataset(dataset, decode_images=not args.no_decode, progress=sys.stderr.isatty())
    print(format_report(report))
    return 1 if report["errors"] else 0


def cmd_convert(args) -> int:
    from detkit.convert import convert_torchvision

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    info = convert_torchvision(args.src, out, num_classes=args.num_classes)
    print(f"wrote {out}: {info}")
    return 0


def cmd_proposals(args) -> int:
    from detkit.modeling.proposals.cli import run_proposals_command

    return run_proposals_command(args)


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detkit", description="Two-stage object detection: train, evaluate, demo.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a detector from a YAML config")
    t.add_argument("config")
    t.add_argument("--out", help="run folder (default: work_dirs/<config name>, never reusing a finished run)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iter=100")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the config's test set")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", help="output folder (default: <checkpoint folder>/eval)")
    e.add_argument("--plot", action="store_true", help="also write per-class PR curves")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="run a checkpoint on images, write JSON + PNG per image")
    d.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--score-thresh", type=float, default=0.5,
                   help="minimum score to report and draw (default 0.5; evaluation keeps the config's 0.05)")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    d.set_defaults(func=cmd_demo, overrides=[])

    ev = sub.add_parser("evaluate", help="score a detection file against a dataset")
    ev.add_argument("--dataset", required=True, help="dataset YAML ({format: voc, root: ..., split: test})")
    ev.add_argument("--detections", required=True, help="COCO-style results JSON")
    ev.add_argument("--metric", default="voc07", choices=["voc07", "voc", "coco"])
    ev.add_argument("--out", help="write the result JSON here")
    ev.add_argument("--plot", metavar="DIR", help="write per-class PR curves (PNG) here")
    ev.set_defaults(func=cmd_evaluate)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    s = dsub.add_parser("shapes", help="generate the synthetic shapes dataset (VOC layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=300)
    s.add_argument("--num-test", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--coco-json", action="store_true", help="also write COCO json annotations")
    s.add_argument("--overwrite", action="store_true", help="regenerate our own files in --out")
    s.set_defaults(func=cmd_data_shapes)
    c = dsub.add_parser("check", help="validate a dataset and print statistics")
    c.add_argument("dataset", help="dataset YAML or full config")
    c.add_argument("--split", default="test", choices=["train", "test"], help="which split of a full config")
    c.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    c.set_defaults(func=cmd_data_check)
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    cv = sub.add_parser("convert", help="convert foreign weights to a detkit checkpoint")
    cv.add_argument("--from", dest="source", required=True, choices=["torchvision"])
    cv.add_argument("src", help="torchvision fasterrcnn_resnet50_fpn state_dict (.pth)")
    cv.add_argument("--out", required=True)
    cv.add_argument("--num-classes", type=int, help="foreground classes (default: from the weights)")
    cv.add_argument("--overwrite", action="store_true")
    cv.set_defaults(func=cmd_convert)

    try:
        from detkit.modeling.proposals.cli import add_proposals_parser

        add_proposals_parser(sub, cmd_proposals)
    except ImportError:
        pass
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # Overrides (key=value) may come before or after options; argparse alone would only take
    # them in one place.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logger_state = (list(logger.handlers), logger.level, logger.propagate)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"detkit: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkit: interrupted", file=sys.stderr)
        return 130
    finally:
        # Leave the "detkit" logger as we found it (main() is also called from Python/tests).
        logger.handlers[:], logger.level, logger.propagate = logger_state


if __name__ == "__main__":
    sys.exit(main())

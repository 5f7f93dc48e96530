"""``detkit train CONFIG [--out DIR] [--resume] [--no-progress] [key=value ...]``

Trains the detector a config describes: runs the config's stages in order (SGD training,
the offline stages some pipelines have, evaluation; ``detkit.engine.pipelines``) in the run
folder and prints the evaluation. A folder that already holds a run is only continued with
``--resume``, which skips the finished stages and resumes the one the run was in.

Started by torchrun (``torchrun --nproc_per_node=N -m detkit train ...``) it trains on N
processes (``detkit.engine.distributed``): rank 0 chooses and writes the run folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from detkit.cli.common import default_out, load_run_config
from detkit.config import dump_config
from detkit.data.build import build_datasets
from detkit.engine import distributed
from detkit.engine.evaluate import summary_lines
from detkit.engine.inference import denormals_flushed, device_from_config
from detkit.engine.pipelines import stages_for
from detkit.engine.proposals import check_proposal_files
from detkit.engine.stages import RunContext, run_stages
from detkit.engine.trainer import RUN_FILES, check_output_dir
from detkit.errors import TrainingError
from detkit.modeling.build import build_model, check_model_config, model_summary

NAME = "train"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    t = sub.add_parser(NAME, help="train a detector from a YAML config")
    t.add_argument("config")
    t.add_argument("--out", help="run folder (default: work_dirs/<config name>, never reusing a finished run)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the periodic log lines stay)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iter=100")
    t.set_defaults(func=run)


def save_run_config(cfg, out: Path, resume: bool) -> None:
    """config.yaml of a run is written once; a resume with another config keeps it and
    saves the new one beside it (config_resume_<time>.yaml)."""
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


def run(args) -> int:
    cfg = load_run_config(args.config, args.overrides)
    # Before any tensor work, so that torch's thread pool inherits the mode (see denormals_flushed).
    with denormals_flushed(cfg.train.flush_denormal), distributed.failures_reported():
        return _run(args, cfg)


def _output_dir(args) -> Path:
    out = Path(args.out) if args.out else default_out(args.config, RUN_FILES, args.resume)
    check_output_dir(out, args.resume)
    return out


def _run(args, cfg) -> int:
    device = device_from_config(cfg.train.device)
    device = distributed.init_distributed(cfg.train.dist_backend, device, cfg.train.dist_timeout_min)
    out = distributed.on_main(lambda: _output_dir(args), "choosing the run folder")
    check_model_config(cfg.model)  # a bad model key fails before the datasets load
    check_proposal_files(cfg, args.config)  # likewise a missing proposal file (with the command that makes it)
    backbone = cfg.model.backbone
    if "syncbn" in (backbone.norm, backbone.fpn_norm) and not distributed.is_distributed():
        raise TrainingError(distributed.SYNCBN_NEEDS_PROCESSES)
    with distributed.quiet_unless_main():  # every rank loads the data; rank 0 reports on it
        train_set, test_set, classes = distributed.main_first(
            lambda: build_datasets(cfg, need_train=True, need_test=cfg.data.test is not None), "loading the datasets"
        )
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the seeded run
    model = build_model(cfg.model, len(classes), cfg.data.input)
    cfg.data.classes = list(classes)
    # The run context checks train.tensorboard before anything is written.
    context = RunContext(
        cfg,
        model,
        train_set,
        test_set,
        out,
        classes,
        device=device,
        resume=args.resume,
        progress=not args.no_progress and distributed.is_main(),
    )
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, out, args.resume)
    logger.info(
        "train: %d images, %s; test: %s images; classes: %s",
        len(train_set),
        cfg.data.train.format if cfg.data.train else "?",
        len(test_set) if test_set else 0,
        ", ".join(classes),
    )
    logger.info("model: %s; output: %s", model_summary(model), out)
    stages = stages_for(cfg)
    results = run_stages(stages, context)
    if "evaluation" in results:
        print(summary_lines(results["evaluation"]))
    logger.info("done: %s", out)
    return 0

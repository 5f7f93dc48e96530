"""``detkit demo --checkpoint CKPT [--config CONFIG] --out DIR INPUT...``

Runs a checkpoint on image files, folders or glob patterns and writes, per image, a PNG
with the detections drawn and a JSON with the boxes in the image's own pixels. An
unreadable input is reported and skipped (exit status 1), the others still run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

from detkit.cli.common import expand_inputs, load_run_config
from detkit.data.io import read_image_array
from detkit.engine.inference import denormals_flushed
from detkit.engine.predictor import Predictor
from detkit.errors import ImageReadError, UsageError
from detkit.visualize import draw_detections, save_rgb

NAME = "demo"
logger = logging.getLogger("detkit")


def add_parser(sub) -> None:
    d = sub.add_parser(NAME, help="run a checkpoint on images, write JSON + PNG per image")
    d.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--out", required=True)
    d.add_argument(
        "--score-thresh",
        type=float,
        default=0.5,
        help="minimum score to report and draw (default 0.5; evaluation keeps the config's 0.05)",
    )
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    d.set_defaults(func=run, overrides=[])


def run(args) -> int:
    cfg = load_run_config(args.config, args.overrides) if args.config else None
    # Before any tensor work, so that torch's thread pool inherits the mode (see
    # denormals_flushed); on unless --config turns train.flush_denormal off.
    with denormals_flushed(cfg.train.flush_denormal if cfg is not None else True):
        return _run(args, cfg)


def _run(args, cfg) -> int:
    predictor = Predictor.from_checkpoint(args.checkpoint, cfg)
    predictor.model.roi_head.score_thresh = args.score_thresh
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UsageError("no input images")
    failed = 0
    stems: Dict[str, int] = {}
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
                {
                    "box": [round(float(v), 2) for v in b],
                    "score": round(float(s), 4),
                    "label": int(lab),
                    "class": predictor.class_names[int(lab) - 1],
                }
                for b, s, lab in zip(boxes, scores, labels)
            ],
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        save_rgb(out / f"{stem}.png", draw_detections(image, boxes, scores, labels, predictor.class_names))
        logger.info("%s: %d detection%s", path, len(boxes), "" if len(boxes) == 1 else "s")
    logger.info("wrote %d results to %s", len(paths) - failed, out)
    return 1 if failed else 0

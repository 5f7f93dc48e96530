"""``detkit export [CONFIG] --checkpoint CKPT --format onnx|torchscript --out FILE [--overwrite] [key=value ...]``

Writes a trained detector as one ONNX or TorchScript file (``detkit.engine.export``): the
graph takes one normalised, resized image (3, H, W) of any size and returns boxes (R, 4) xyxy
IN THE PIXELS OF THAT INPUT, scores (R,) and labels (R,) in 1..K. The file's metadata holds
the resize sizes, the normalisation and the class names; ``tools/onnx_infer.py`` shows how to
use an ONNX file with onnxruntime alone.

CONFIG is optional: the checkpoint stores its config; given, it replaces the stored one
(``key=value`` overrides apply to whichever is used, e.g. ``model.roi_head.score_thresh=0.3``
is baked into the graph, ``data.input.min_size_test=600`` into the metadata). ``--format``
may be left out when FILE ends in .onnx (onnx) or .pt / .ts (torchscript). An existing FILE
is replaced only with ``--overwrite``, and never when it is the checkpoint itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from detkit.cli.common import load_run_config
from detkit.config import apply_overrides, from_dict
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.export import FORMATS, check_exportable, export_model
from detkit.engine.predictor import model_from_checkpoint
from detkit.errors import CheckpointError, UsageError
from detkit.schema import Config

NAME = "export"
logger = logging.getLogger("detkit")

_SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}


def add_parser(sub) -> None:
    e = sub.add_parser(
        NAME,
        help="write a checkpoint as an ONNX or TorchScript file (image in, boxes/scores/labels out)",
        description=(
            "Export a Faster R-CNN checkpoint (RPN proposals, fast_rcnn or res5 head) to ONNX or TorchScript. "
            "The graph takes ONE image as float32 (3, H, W), any H and W: RGB / 255, normalised with the "
            "config's pixel_mean / pixel_std, resized so that the shorter side is data.input.min_size_test "
            "(longer side at most max_size). It returns boxes (R, 4) xyxy in the pixels of that resized input "
            "(divide by the resize factor for original pixels), scores (R,) best first and labels (R,) in 1..K. "
            "Sizes, mean/std and class names are stored in the file (ONNX metadata key 'detkit', TorchScript "
            "extra file 'detkit.json'). Models with Selective Search or proposal-file proposals, R-CNN / SPP-net "
            "heads or multi-scale testing are refused. key=value overrides apply to CONFIG or to the stored "
            "config (e.g. model.roi_head.score_thresh=0.3 is baked into the graph)."
        ),
    )
    e.add_argument("config", nargs="?", help="config (default: the one stored in the checkpoint)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument(
        "--format", choices=FORMATS, help="onnx or torchscript (default: from the --out suffix: .onnx, .pt, .ts)"
    )
    e.add_argument(
        "--out", required=True, metavar="FILE", help="the file to write (kept if it exists, see --overwrite)"
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    e.add_argument("--no-check", action="store_true", help="do not run the written file against the eager model")
    # key=value overrides are collected by detkit.cli.main (they may come anywhere).
    e.set_defaults(func=run, overrides=[])


def _format(args, out: Path) -> str:
    if args.format:
        return args.format
    fmt = _SUFFIX_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--format: say onnx or torchscript (cannot tell from the name {out.name})")
    return fmt


def _config(args):
    """The config to build the model with: CONFIG with the overrides, the checkpoint's own
    with the overrides, or None (the checkpoint's, unchanged)."""
    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not os.path.isfile(config):
        # argparse hands the first key=value to the optional CONFIG positional.
        overrides.insert(0, config)
        config = None
    if config:
        return load_run_config(config, overrides)
    if not overrides:
        return None
    stored = load_checkpoint(args.checkpoint).get("config")
    if stored is None:
        raise CheckpointError(f"{args.checkpoint} stores no config; pass CONFIG")
    return from_dict(Config, apply_overrides(dict(stored), overrides))


def run(args) -> int:
    out = Path(args.out)
    fmt = _format(args, out)
    ckpt = Path(args.checkpoint)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write")
    if out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself; write the export to another file")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    model, cfg, class_names = model_from_checkpoint(ckpt, _config(args), "cpu")
    check_exportable(model)
    logger.info("exporting %s to %s (%s)", ckpt, out, fmt)
    report = export_model(model, cfg, class_names, out, fmt, source=ckpt.name, check=not args.no_check)
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({fmt}, {size_mb:.1f} MB, {len(class_names)} classes)")
    print(
        "  input: image float32 (3, H, W), normalised and resized (shorter side "
        f"{cfg.data.input.min_size_test}, longer at most {cfg.data.input.max_size}); "
        "output: boxes (R, 4) xyxy in the input's pixels, scores (R,), labels (R,) in 1..K"
    )
    if not args.no_check:
        print(f"  {report.summary()}")
    return 0

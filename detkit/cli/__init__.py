"""The ``detkit`` command line (also ``python -m detkit``): one module per verb.

    detkit train CONFIG [--out DIR] [--resume] [key=value ...]
    detkit eval CONFIG --checkpoint CKPT [--out DIR] [--analyze] [key=value ...]
    detkit demo --config CONFIG --checkpoint CKPT INPUT... --out DIR
    detkit evaluate --dataset DATA.yaml --detections DETS.json --metric voc07|voc|coco
    detkit data shapes|check|browse ...
    detkit plot RUN_DIR [RUN_DIR ...] --out PNG
    detkit report RUN_DIR --out report.html
    detkit convert --from torchvision SRC.pth --out CKPT
    detkit proposals DATA_OR_CONFIG.yaml --method selective_search|rpn --out FILE [--eval] ...
    detkit compress CKPT --fc6 RANK --fc7 RANK --out CKPT2 [--no-eval]
    detkit compare DATA.yaml --recipe shapes|bccd --out DIR [--backbone NAME] [--iters N]
    detkit export [CONFIG] --checkpoint CKPT --format onnx|torchscript --out FILE

The CLI is the top layer: nothing in detkit imports it. Each verb module has
``add_parser(subparsers)`` and a handler; ``COMMANDS`` lists them explicitly (an import
error in one fails loudly instead of hiding the verb). Errors a user can fix
(``detkit.errors.DetkitError``) print one line and exit with 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from detkit.cli import (
    common,
    compare,
    compress,
    convert,
    data,
    demo,
    evaluate,
    export,
    plot,
    proposals,
    report,
    train,
)
from detkit.cli import eval as eval_
from detkit.engine import distributed
from detkit.errors import DetkitError, UsageError

logger = logging.getLogger("detkit")

# The verbs, in the order `detkit --help` lists them.
COMMANDS = (train, eval_, demo, evaluate, data, plot, report, convert, proposals, compress, compare, export)
# The verbs that share their work across the processes torchrun starts; the others refuse
# to run under it (N copies would write the same files).
DISTRIBUTED_COMMANDS = (train.NAME, eval_.NAME, proposals.NAME)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detkit", description="Two-stage object detection: train, evaluate, demo.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
    common.setup_logging(args.verbose)
    try:
        if args.command not in DISTRIBUTED_COMMANDS and distributed.launch_from_env().world_size > 1:
            raise UsageError(
                f"detkit {args.command} runs in one process: start it without torchrun "
                f"(only {', '.join(DISTRIBUTED_COMMANDS)} share their work across processes)"
            )
        return int(args.func(args) or 0)
    except DetkitError as exc:
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

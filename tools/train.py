"""Thin wrapper: ``python tools/train.py CONFIG [--out DIR] [--resume] [key=value ...]``
is ``detkit train``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))

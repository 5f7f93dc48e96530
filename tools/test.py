"""Thin wrapper: ``python tools/test.py CONFIG --checkpoint CKPT [--out DIR]`` is ``detkit eval``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))

"""Thin wrapper: ``python tools/compare.py DATA.yaml --recipe shapes --out DIR ...`` is ``detkit compare``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare"] + sys.argv[1:]))

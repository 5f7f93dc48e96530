"""Run a trained detector on images: ``python demo/demo.py --checkpoint CKPT --out DIR INPUT...``
(files, folders or globs; ``--config CONFIG`` to override the stored config). Writes
DIR/<stem>.json (boxes xyxy in original pixels, scores, class names) and DIR/<stem>.png.
The same as ``detkit demo``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo"] + sys.argv[1:]))

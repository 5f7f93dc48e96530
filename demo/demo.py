"""Run a trained detector on images or videos: ``python demo/demo.py --checkpoint CKPT --out DIR INPUT...``
(files, folders, globs or video files; ``--config CONFIG`` to override the stored config).
Writes DIR/<stem>.json (boxes xyxy in original pixels, scores, class names) and DIR/<stem>.png
(a video input: DIR/<stem>.mp4 + .json). Options: --score-thresh, --max-dets N, --classes a,b,
--show-gt (ground truth dashed, for images of the config's dataset), --video OUT.mp4 (image
inputs as the frames of one video), --fps. The same as ``detkit demo``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo"] + sys.argv[1:]))

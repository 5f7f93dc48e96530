"""Regenerates the README's pictures under docs/ from a trained run, with detkit's own
commands (so the pictures show exactly what a user gets):

    python tools/docs_figures.py RUN_DIR [--out docs] [--images 6]

    docs/data_browse.png    `detkit data browse` contact sheet of the run's test split
    docs/demo_example.png   `detkit demo --show-gt` on test images (detections solid, ground truth dashed)
    docs/curves.png         `detkit plot RUN_DIR`
    docs/errors.png         `detkit eval --analyze`: the error breakdown and the worst false positives

RUN_DIR is a finished `detkit train` run (config.yaml, model_final.pt); for the README, the
quick start: `detkit train configs/faster_rcnn/quickstart_shapes.yaml --out RUN_DIR`.
Each PNG is kept small (< 200 KB): palette-quantised (and shrunk) when that is needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import main as detkit  # noqa: E402
from detkit.data.build import build_dataset  # noqa: E402
from detkit.schema import load_run_config  # noqa: E402
from detkit.visualize import contact_sheet, save_rgb  # noqa: E402

MAX_BYTES = 200_000


def _read(path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise SystemExit(f"cannot read {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write_small(path: Path, image: np.ndarray) -> None:
    """PNG under MAX_BYTES: as is if it fits, else with a 256-colour palette (the pictures
    are flat colours and noise, which a palette keeps well), else also shrunk."""
    from PIL import Image

    save_rgb(path, image)
    while path.stat().st_size > MAX_BYTES:
        Image.fromarray(image).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True
        )
        if path.stat().st_size <= MAX_BYTES or image.shape[1] < 300:
            return
        image = cv2.resize(image, None, fx=0.85, fy=0.85, interpolation=cv2.INTER_AREA)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished detkit train run folder")
    p.add_argument("--out", default="docs")
    p.add_argument("--images", type=int, default=6, help="images on the browse / demo sheets")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = str(run / "config.yaml")
    cfg = load_run_config(config)
    if cfg.data.test is None:
        raise SystemExit(f"{config} has no data.test dataset")
    test = build_dataset(cfg.data.test, cfg.data.classes)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        _check(
            detkit(["data", "browse", config, "--out", str(tmp / "browse"), "--num", str(args.images), "--seed", "1"]),
            "data browse",
        )
        _write_small(out / "data_browse.png", _read(tmp / "browse" / "contact_sheet.png"))

        images = [r.file_name for r in test.records[: args.images]]
        _check(
            detkit(
                ["demo", "--checkpoint", str(run / "model_final.pt"), "--out", str(tmp / "demo"), "--show-gt"] + images
            ),
            "demo",
        )
        drawn = [_read(tmp / "demo" / f"{Path(f).stem}.png") for f in images]
        titles = [Path(f).stem for f in images]
        _write_small(out / "demo_example.png", contact_sheet(drawn, titles, cell=(240, 200), cols=3))

        _check(detkit(["plot", str(run), "--out", str(tmp / "curves.png")]), "plot")
        _write_small(out / "curves.png", _read(tmp / "curves.png"))

        _check(
            detkit(
                ["eval", config, "--checkpoint", str(run / "model_final.pt"), "--out", str(tmp / "eval"), "--analyze"]
                + ["--no-progress"]
            ),
            "eval --analyze",
        )
        errors = _read(tmp / "eval" / "analysis" / "errors.png")
        worst = _read(tmp / "eval" / "analysis" / "worst_false_positives.png")
        scale = errors.shape[1] / worst.shape[1]
        worst = cv2.resize(worst, (errors.shape[1], int(round(worst.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        _write_small(out / "errors.png", np.concatenate([errors, worst], axis=0))
    for name in ("data_browse", "demo_example", "curves", "errors"):
        print(f"{out / name}.png  {(out / f'{name}.png').stat().st_size / 1000:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

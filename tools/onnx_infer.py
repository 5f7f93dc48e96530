"""Run a detector exported by ``detkit export --format onnx`` with onnxruntime alone (no
detkit, no torch): read an image, resize and normalise it as the file's metadata says, run
the graph, map the boxes back to the image's own pixels, print them and optionally draw them.

    python tools/onnx_infer.py MODEL.onnx IMAGE [IMAGE ...] [--score-thresh 0.5] [--draw DIR] [--json OUT.json]

Needs numpy, onnxruntime and Pillow (or OpenCV) only. The graph's contract (``detkit export
--help``): input ``image`` float32 (3, H, W), RGB / 255, normalised with ``pixel_mean`` /
``pixel_std``, then resized so that the shorter side is ``min_size`` unless the longer would
exceed ``max_size``; outputs ``boxes`` (R, 4) xyxy in the pixels of that input, ``scores``
(R,) and ``labels`` (R,) in 1..K (``class_names[label - 1]``). The sizes, mean/std and class
names are read from the file's metadata (key ``detkit``, JSON).

The resize below is the bilinear interpolation detkit's pipeline uses (torch's
``F.interpolate``, align_corners=False, no antialiasing), written out in NumPy so that this
script feeds the graph the same pixels detkit would (PIL's and OpenCV's resizers differ
slightly: antialiasing, fixed-point arithmetic).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, with Pillow or, without it, OpenCV."""
    try:
        from PIL import Image
    except ImportError:
        return read_rgb_cv2(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise SystemExit(f"onnx_infer: cannot read image {path}: {exc}") from None


def read_rgb_cv2(path: str) -> np.ndarray:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"onnx_infer: cannot read image {path}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, out_h, out_w), as torch's bilinear F.interpolate with
    align_corners=False: output pixel i samples source coordinate (i + 0.5) * in / out - 0.5,
    clamped at 0, between its two neighbours."""

    def taps(size_in: int, size_out: int):
        scale = np.float32(size_in) / np.float32(size_out)
        src = ((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)).clip(min=0)
        lo = src.astype(np.int64)  # floor: src >= 0
        hi = np.minimum(lo + 1, size_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, frac

    _, h, w = image.shape
    y0, y1, fy = taps(h, out_h)
    x0, x1, fx = taps(w, out_w)
    rows = image[:, y0, :] * (1 - fy)[None, :, None] + image[:, y1, :] * fy[None, :, None]
    return (rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]).astype(np.float32)


def preprocess(rgb: np.ndarray, meta: dict):
    """(H, W, 3) uint8 -> the graph's input (3, h, w) float32 and (h, w)."""
    height, width = rgb.shape[:2]
    mean = np.asarray(meta["pixel_mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["pixel_std"], dtype=np.float32)[:, None, None]
    image = (rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0) - mean) / std  # normalise first
    s = min(meta["min_size"] / min(height, width), meta["max_size"] / max(height, width))
    h, w = int(math.floor(height * s)), int(math.floor(width * s))
    return resize_bilinear(image, h, w), (h, w)


def to_original(boxes: np.ndarray, size, orig_size) -> np.ndarray:
    """Boxes in the resized input -> the original image's pixels (per axis: original / resized)."""
    (h, w), (oh, ow) = size, orig_size
    rw, rh = np.float32(ow) / np.float32(w), np.float32(oh) / np.float32(h)
    return boxes * np.array([rw, rh, rw, rh], dtype=np.float32)


def draw(rgb: np.ndarray, detections, path: Path) -> None:
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb)
    pen = ImageDraw.Draw(im)
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        pen.text((x1 + 2, max(y1 - 11, 0)), f"{d['class']} {d['score']:.2f}", fill=(255, 40, 40))
    im.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run a detkit ONNX export with onnxruntime alone")
    p.add_argument("model", help="file written by detkit export --format onnx")
    p.add_argument("images", nargs="+")
    p.add_argument("--score-thresh", type=float, default=0.5, help="report detections scoring at least this")
    p.add_argument("--draw", metavar="DIR", help="write each image with its detections drawn to DIR")
    p.add_argument("--json", metavar="OUT", help="write all detections (original pixels) as JSON")
    args = p.parse_args(argv)

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta_text = session.get_modelmeta().custom_metadata_map.get("detkit")
    if meta_text is None:
        raise SystemExit(f"onnx_infer: {args.model} has no 'detkit' metadata (not written by detkit export)")
    meta = json.loads(meta_text)
    names = meta["class_names"]
    results = {}
    for path in args.images:
        rgb = read_rgb(path)
        image, size = preprocess(rgb, meta)
        start = time.perf_counter()
        boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"image": image})
        ms = (time.perf_counter() - start) * 1000
        boxes = to_original(boxes, size, rgb.shape[:2])
        keep = scores >= args.score_thresh
        detections = [
            {"class": names[int(k) - 1], "label": int(k), "score": float(s), "box": [float(v) for v in b]}
            for b, s, k in zip(boxes[keep], scores[keep], labels[keep])
        ]
        results[path] = detections
        shape = f"{rgb.shape[1]}x{rgb.shape[0]} px, input {size[1]}x{size[0]}"
        print(f"{path}: {len(detections)} detections ({shape}, {ms:.0f} ms)")
        for d in detections:
            x1, y1, x2, y2 = d["box"]
            print(f"  {d['class']:<16} {d['score']:.3f}  {x1:7.1f} {y1:7.1f} {x2:7.1f} {y2:7.1f}")
        if args.draw:
            out_dir = Path(args.draw)
            out_dir.mkdir(parents=True, exist_ok=True)
            draw(rgb, detections, out_dir / (Path(path).stem + "_detections.png"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

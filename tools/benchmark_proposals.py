#!/usr/bin/env python
"""Benchmark detkit's Selective Search against OpenCV-contrib's, side by side.

Both run on the same images with the same thread count (default 1: OpenCV's
``cv2.setNumThreads`` and the OMP/BLAS variables, set before numpy is imported). Reported per
method: seconds per image (the proposal call only, image decoding excluded), boxes per image,
and recall (fraction of ground-truth boxes with IoU >= 0.5 to at least one proposal) among the
first n proposals for n in --counts and for all proposals; then detkit / OpenCV ratios.

OpenCV-contrib is a benchmark-only extra whose ``cv2`` replaces opencv-python-headless's, so
it lives in its own environment and runs in a subprocess of ``--opencv-python``; boxes come
back through one .npz per image in a temporary folder. The two sides alternate image by
image, so that load from other users of a shared machine hits both alike. detkit's first
call in a process builds (or loads from numba's disk cache) the compiled segmentation loop;
it is made once on a small image before the timed images and reported as
``detkit_warmup_seconds``.

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install numpy opencv-contrib-python-headless
    python tools/benchmark_proposals.py --opencv-python /work/bench-venv/bin/python --json out.json

Default images: the first 15 of BCCD's ImageSets/Main/test.txt under the shared data folder
(``$DETKIT_SHARED/data/BCCD`` or ``../shared/data/BCCD`` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, cast

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

# Runs inside --opencv-python as a long-lived worker, so that its images interleave with
# detkit's (a load spike from other users of the machine then hits both sides alike).
# argv = mode threads; stdin lines "image_path<TAB>out.npz"; for each it writes the boxes to
# out.npz and prints the seconds spent in setBaseImage + switchTo... + process(), the same
# span as detkit's selective_search() call. Boxes come back xyxy (OpenCV gives x, y, w, h).
OPENCV_WORKER = r"""
import sys, time
import numpy as np, cv2
mode, threads = sys.argv[1], int(sys.argv[2])
cv2.setNumThreads(threads)
print("ready", flush=True)
for line in sys.stdin:
    path, out = line.rstrip("\n").split("\t")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"opencv worker: cannot read image {path}")
    start = time.perf_counter()
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    else:
        ss.switchToSingleStrategy()
    rects = ss.process()
    seconds = time.perf_counter() - start
    rects = np.asarray(rects, np.float32).reshape(-1, 4)
    np.savez(out, boxes=np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1))
    print(seconds, flush=True)
"""


def default_root() -> Path:
    shared = os.environ.get("DETKIT_SHARED")
    base = Path(shared) if shared else Path(__file__).resolve().parents[1] / ".." / "shared"
    return base / "data" / "BCCD"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=default_root(), help="VOC-layout dataset root")
    p.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt")
    p.add_argument("--num-images", type=int, default=15, help="first N images of the split")
    p.add_argument("--mode", default="fast", choices=("single", "fast", "quality"))
    p.add_argument("--counts", default="100,300,1000,2000", help="recall after the first n boxes")
    p.add_argument("--threads", type=int, default=1, help="threads for both sides")
    p.add_argument(
        "--min-size", type=float, default=None, help="detkit's min box side (default: selective_search's default)"
    )
    p.add_argument("--scale", type=float, default=None, help="detkit's resize factor (default none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--opencv-python", default=sys.executable, help="interpreter whose cv2 has ximgproc (default: this one)"
    )
    p.add_argument("--skip-opencv", action="store_true", help="measure detkit only")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p.parse_args(argv)


def load_split(root: Path, split: str, num_images: int):
    """-> list of (image path, (G, 4) float xyxy ground truth, internal pixel convention)."""
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        sys.exit(f"benchmark_proposals: split file not found: {split_file}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    items = []
    for image_id in ids[:num_images]:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_path).getroot()
        except (OSError, ET.ParseError) as exc:
            sys.exit(f"benchmark_proposals: cannot read annotation {xml_path}: {exc}")
        name = tree.findtext("filename") or f"{image_id}.jpg"
        image_path = root / "JPEGImages" / name
        if not image_path.is_file():
            image_path = root / "JPEGImages" / f"{image_id}.jpg"
        boxes = []
        for obj in tree.findall("object"):
            if (obj.findtext("difficult") or "0").strip() == "1":
                continue  # VOC ignores difficult objects in recall as in AP
            bb = obj.find("bndbox")
            corners = [None if bb is None else bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
            try:
                x1, y1, x2, y2 = (float(c) for c in corners)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                sys.exit(f"benchmark_proposals: {xml_path}: an object has no numeric bndbox xmin/ymin/xmax/ymax")
            boxes.append((x1 - 1, y1 - 1, x2, y2))  # VOC 1-based inclusive -> detkit xyxy
        items.append((str(image_path), boxes))
    return items


def recall_at(gt_per_image, boxes_per_image, count):
    """Fraction of GT boxes with IoU >= 0.5 to one of the first ``count`` boxes (None = all)."""
    import numpy as np

    hit = total = 0
    for gt, boxes in zip(gt_per_image, boxes_per_image):
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        boxes = np.asarray(boxes, np.float64)[:count]
        total += len(gt)
        if not len(gt) or not len(boxes):
            continue
        lt = np.maximum(gt[:, None, :2], boxes[None, :, :2])
        rb = np.minimum(gt[:, None, 2:], boxes[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(axis=2)
        area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = inter / (area_g[:, None] + area_b[None, :] - inter)
        hit += int((iou.max(axis=1) >= 0.5).sum())
    return hit / max(total, 1)


class OpenCVWorker:
    """OpenCV-contrib's selective search in a subprocess of ``python`` (see OPENCV_WORKER)."""

    def __init__(self, python: str, mode: str, threads: int, tmp: Path):
        probe = subprocess.run([python, "-c", "import cv2; cv2.ximgproc.segmentation"], capture_output=True, text=True)
        if probe.returncode != 0:
            sys.exit(
                f"benchmark_proposals: {python} has no OpenCV-contrib (cv2.ximgproc); install "
                f"it in a separate venv: python3 -m venv /work/bench-venv && "
                f"/work/bench-venv/bin/pip install numpy opencv-contrib-python-headless, "
                f"then pass --opencv-python /work/bench-venv/bin/python"
            )
        env = dict(os.environ, **{var: str(threads) for var in THREAD_VARS})
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [python, "-c", OPENCV_WORKER, mode, str(threads)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Both pipes exist (PIPE above); typed handles for the reads and writes below.
        self.stdin = cast(IO[str], self.proc.stdin)
        self.stdout = cast(IO[str], self.proc.stdout)
        self._read()  # "ready": imports done before the first timed image

    def _read(self) -> str:
        line = self.stdout.readline()
        if not line:
            sys.exit(f"benchmark_proposals: the OpenCV worker died (exit {self.proc.wait()})")
        return line.strip()

    def __call__(self, path: str, index: int):
        import numpy as np

        out = self.tmp / f"opencv_{index}.npz"
        self.stdin.write(f"{path}\t{out}\n")
        self.stdin.flush()
        seconds = float(self._read())
        with np.load(out) as data:
            return data["boxes"], seconds

    def close(self):
        self.stdin.close()
        self.proc.wait()


def detkit_runner(mode, min_size, scale, seed):
    import cv2

    from detkit.modeling.proposals.selective_search import selective_search

    kwargs = {"mode": mode, "scale": scale, "seed": seed}
    if min_size is not None:
        kwargs["min_size"] = min_size

    def run(path: str, index: int):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            sys.exit(f"benchmark_proposals: cannot read image {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        start = time.perf_counter()
        boxes, _ = selective_search(image, **kwargs)
        return boxes, time.perf_counter() - start

    return run


def detkit_warmup() -> float:
    """Seconds of a first call on a small image: the segmentation's compiled loop (numba) is
    built, or loaded from its disk cache, at the first call of a process. Done before the
    timed images and reported on its own."""
    import numpy as np

    from detkit.modeling.proposals.selective_search import selective_search

    start = time.perf_counter()
    selective_search(np.full((32, 32, 3), 128, np.uint8), mode="single")
    return time.perf_counter() - start


def summarise(name, boxes, times, gt, counts):
    import numpy as np

    row = {
        "method": name,
        "seconds_per_image": float(np.mean(times)),
        "boxes_per_image": float(np.mean([len(b) for b in boxes])),
        "recall": {str(c): recall_at(gt, boxes, c) for c in counts},
    }
    row["recall"]["all"] = recall_at(gt, boxes, None)
    return row


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv=None):
    args = parse_args(argv)
    # Same thread count on both sides; must precede the first numpy / cv2 import.
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    try:
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
    except ValueError:
        sys.exit(f"benchmark_proposals: --counts must be comma-separated integers, got {args.counts!r}")

    items = load_split(args.root, args.split, args.num_images)
    images = [path for path, _ in items]
    gt = [boxes for _, boxes in items]
    print(
        f"{len(images)} images from {args.root} ({args.split}), mode={args.mode}, "
        f"threads={args.threads}, {sum(len(g) for g in gt)} GT boxes",
        flush=True,
    )

    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        worker = None
        if not args.skip_opencv:
            worker = OpenCVWorker(args.opencv_python, args.mode, args.threads, Path(tmp))
            runners["opencv-contrib"] = worker
        runners["detkit"] = detkit_runner(args.mode, args.min_size, args.scale, args.seed)
        warmup_seconds = detkit_warmup()
        print(f"detkit warm-up (numba compile or cache load): {warmup_seconds:.2f}s", flush=True)
        outputs = {name: ([], []) for name in runners}
        for index, path in enumerate(images):  # image by image, the two sides alternating
            for name, run in runners.items():
                boxes, seconds = run(path, index)
                outputs[name][0].append(boxes)
                outputs[name][1].append(seconds)
            print(
                f"  {index + 1}/{len(images)} " + "  ".join(f"{name} {outputs[name][1][-1]:.2f}s" for name in runners),
                flush=True,
            )
        if worker is not None:
            worker.close()
    rows = [summarise(name, boxes, times, gt, counts) for name, (boxes, times) in outputs.items()]

    header = f"{'method':16s} {'s/img':>7s} {'boxes/img':>9s} " + " ".join(f"{'R@' + k:>7s}" for k in rows[0]["recall"])
    print(header)
    for row in rows:
        print(
            f"{row['method']:16s} {row['seconds_per_image']:7.3f} {row['boxes_per_image']:9.0f} "
            + " ".join(f"{v:7.3f}" for v in row["recall"].values())
        )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "threads": args.threads,
        "mode": args.mode,
        "split": args.split,
        "images": [Path(p).name for p in images],
        "num_gt": sum(len(g) for g in gt),
        "detkit_options": {"min_size": args.min_size, "scale": args.scale, "seed": args.seed},
        "detkit_warmup_seconds": warmup_seconds,
        "results": rows,
    }
    if len(rows) == 2:
        cv_row, dk_row = rows
        report["ratios_detkit_over_opencv"] = {
            "time": dk_row["seconds_per_image"] / cv_row["seconds_per_image"],
            "boxes": dk_row["boxes_per_image"] / max(cv_row["boxes_per_image"], 1e-9),
            "recall": {k: dk_row["recall"][k] / max(cv_row["recall"][k], 1e-9) for k in dk_row["recall"]},
        }
        r = report["ratios_detkit_over_opencv"]
        print(
            f"detkit/opencv    time x{r['time']:.2f}  boxes x{r['boxes']:.2f}  recall "
            + " ".join(f"{k}:x{v:.3f}" for k, v in r["recall"].items())
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()

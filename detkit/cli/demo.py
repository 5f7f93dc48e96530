"""``detkit demo --checkpoint CKPT [--config CONFIG] --out DIR INPUT...``

Runs a checkpoint on image files, folders or glob patterns and writes, per image, a PNG
with the detections drawn and a JSON with the boxes in the image's own pixels; one summary
line per image (detections per class, milliseconds).

    --score-thresh S        draw / report detections scoring at least S (default 0.5)
    --max-dets N            at most the N best detections per image
    --classes a,b           only these classes
    --show-gt               also draw the ground truth (dashed) of images that belong to the
                            config's dataset (matched by path, else by image id = file name)
    --video OUT.mp4|.avi    the image inputs are frames: write one annotated video instead
                            of PNGs (OUT.json holds the detections per frame)
    --fps F                 frame rate of that video (default 10)

A video file among the inputs (.mp4, .avi, .mov, .mkv, ...) becomes DIR/<stem>.mp4 with
every frame annotated, and DIR/<stem>.json. Videos are written with OpenCV's VideoWriter:
.mp4 with the MPEG-4 Part 2 codec (fourcc mp4v), .avi with Motion-JPEG (MJPG), the two
that opencv-python(-headless) wheels can write without extra libraries (H.264, "avc1",
needs an encoder those wheels lack).

An unreadable image or a video that cannot be opened is reported in one line and skipped
(exit status 1); the others still run. An output never replaces an input file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from detkit.cli.common import expand_inputs, load_run_config
from detkit.data.io import read_image_array
from detkit.engine.inference import denormals_flushed
from detkit.engine.predictor import Predictor
from detkit.errors import DetkitError, ImageReadError, UsageError
from detkit.modeling.build import build_selective_search
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.structures import ImageRecord
from detkit.visualize import draw_detections, save_rgb

NAME = "demo"
logger = logging.getLogger("detkit")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# Output container -> fourcc that OpenCV's bundled FFmpeg can encode (see the module docstring).
FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}


class VideoError(DetkitError):
    """A video that cannot be read or written."""


def add_parser(sub) -> None:
    d = sub.add_parser(NAME, help="run a checkpoint on images or videos, write PNG/video + JSON")
    d.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--out", required=True)
    d.add_argument(
        "--score-thresh",
        type=float,
        default=0.5,
        help="minimum score to report and draw (default 0.5; evaluation keeps the config's 0.05)",
    )
    d.add_argument("--max-dets", type=int, metavar="N", help="at most the N highest-scoring detections per image")
    d.add_argument("--classes", metavar="A,B", help="comma-separated class names: report and draw only these")
    d.add_argument(
        "--show-gt",
        action="store_true",
        help="also draw the ground truth (dashed) of images that belong to the config's dataset",
    )
    d.add_argument("--video", metavar="OUT", help="write the image inputs as frames of one video (.mp4 or .avi)")
    d.add_argument("--fps", type=float, default=10.0, help="frame rate of --video (default 10)")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns or videos")
    d.set_defaults(func=run, overrides=[])


# -- ground truth lookup -------------------------------------------------------------------
class GroundTruthIndex:
    """The records of the config's datasets (test, then train), found by resolved image path,
    else by image id equal to the file stem with the same file name (a copied image)."""

    def __init__(self, cfg, class_names):
        from detkit.data.build import build_dataset

        self.by_path: Dict[Path, ImageRecord] = {}
        self.by_name: Dict[Tuple[str, str], ImageRecord] = {}
        loaded = 0
        for which in ("test", "train"):
            ds_cfg = getattr(cfg.data, which)
            if ds_cfg is None:
                continue
            try:
                dataset = build_dataset(ds_cfg, class_names, name=which)
            except DetkitError as exc:
                logger.warning("--show-gt: cannot load data.%s: %s", which, exc)
                continue
            loaded += 1
            for r in dataset.records:
                self.by_path.setdefault(Path(r.file_name).resolve(), r)
                self.by_name.setdefault((str(r.image_id), Path(r.file_name).name), r)
        if not loaded:
            raise UsageError("--show-gt: the config has no dataset that can be loaded (data.test / data.train)")

    def find(self, path: Path) -> Optional[ImageRecord]:
        return self.by_path.get(path.resolve()) or self.by_name.get((path.stem, path.name))


# -- one image -----------------------------------------------------------------------------
class Demo:
    def __init__(self, predictor: Predictor, args, gt_index: Optional[GroundTruthIndex]):
        self.predictor = predictor
        self.names = predictor.class_names
        self.max_dets = args.max_dets
        self.keep_labels = None
        if args.classes:
            wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
            unknown = [c for c in wanted if c not in self.names]
            if unknown:
                raise UsageError(f"--classes: unknown class {unknown[0]!r} (classes: {', '.join(self.names)})")
            self.keep_labels = np.array([self.names.index(c) + 1 for c in wanted])
        self.gt_index = gt_index

    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """-> boxes (R, 4), scores (R,), labels (R,) by descending score, filtered by --classes
        and cut to --max-dets; and the milliseconds the model took."""
        start = time.perf_counter()
        det = self.predictor(image)
        ms = 1000 * (time.perf_counter() - start)
        boxes, scores, labels = det.boxes.numpy(), det.scores.numpy(), det.labels.numpy()
        keep = np.argsort(-scores, kind="stable")
        if self.keep_labels is not None:
            keep = keep[np.isin(labels[keep], self.keep_labels)]
        if self.max_dets is not None:
            keep = keep[: self.max_dets]
        return boxes[keep], scores[keep], labels[keep], ms

    def ground_truth(self, path: Optional[Path], image: np.ndarray) -> Optional[ImageRecord]:
        if self.gt_index is None or path is None:
            return None
        rec = self.gt_index.find(path)
        if rec is None:
            return None
        if (rec.width, rec.height) != (image.shape[1], image.shape[0]):
            logger.warning(
                "--show-gt: %s is %dx%d but its annotation says %dx%d; ground truth not drawn",
                path,
                image.shape[1],
                image.shape[0],
                rec.width,
                rec.height,
            )
            return None
        if self.keep_labels is not None:
            m = np.isin(rec.labels, self.keep_labels)
            rec = ImageRecord(
                rec.image_id, rec.file_name, rec.width, rec.height, rec.boxes[m], rec.labels[m], rec.difficult[m]
            )
        return rec

    def process(self, image: np.ndarray, path: Optional[Path]) -> Tuple[np.ndarray, dict, str]:
        """-> (drawn image, JSON record, summary text)."""
        boxes, scores, labels, ms = self.detect(image)
        gt = self.ground_truth(path, image)
        drawn = draw_detections(
            image,
            boxes,
            scores,
            labels,
            self.names,
            gt.boxes if gt is not None else None,
            gt.labels if gt is not None else None,
        )
        record = {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "detections": [
                {
                    "box": [round(float(v), 2) for v in b],
                    "score": round(float(s), 4),
                    "label": int(lab),
                    "class": self.names[int(lab) - 1],
                }
                for b, s, lab in zip(boxes, scores, labels)
            ],
        }
        counts = Counter(self.names[int(lab) - 1] for lab in labels)
        per_class = f" ({', '.join(f'{n} {c}' for n, c in sorted(counts.items()))})" if counts else ""
        summary = f"{len(boxes)} detection{'' if len(boxes) == 1 else 's'}{per_class}, {ms:.0f} ms"
        if gt is not None:
            record["ground_truth"] = [
                {"box": [round(float(v), 2) for v in b], "label": int(lab), "class": self.names[int(lab) - 1]}
                | ({"difficult": True} if d else {})
                for b, lab, d in zip(gt.boxes, gt.labels, gt.difficult)
            ]
            summary += f", {len(gt.boxes)} ground truth"
        record["ms"] = round(ms, 1)
        return drawn, record, summary


# -- video ---------------------------------------------------------------------------------
def open_writer(path: Path, fps: float, size: Tuple[int, int]) -> cv2.VideoWriter:
    """A VideoWriter for ``path`` (.mp4 or .avi), frames of ``size`` = (width, height)."""
    ext = path.suffix.lower()
    if ext not in FOURCC:
        raise UsageError(f"cannot write video {path}: use a .mp4 or .avi file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*FOURCC[ext]), float(fps), size)
    if not writer.isOpened():
        raise VideoError(f"cannot write video {path} with codec {FOURCC[ext]} (this OpenCV build lacks it?)")
    return writer


class FrameSink:
    """Annotated frames -> a video file; frames of another size than the first are resized
    to it (a video has one frame size), counted in one warning."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[Tuple[int, int]] = None
        self.frames = self.resized = 0

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.size = (rgb.shape[1], rgb.shape[0])
            self.writer = open_writer(self.path, self.fps, self.size)
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
            self.resized += 1
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.resized and self.size is not None:
            w, h = self.size
            logger.warning("%s: resized %d frame(s) to the first frame's size %dx%d", self.path, self.resized, w, h)


def run_video(demo: Demo, path: Path, out_video: Path, out_json: Path) -> str:
    """Annotates every frame of the video at ``path``. -> summary line."""
    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            raise VideoError(f"cannot open video {path} (missing, not a video, or a codec this OpenCV build lacks)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        sink = FrameSink(out_video, fps if fps and fps > 0 else 25.0)
        frames: List[dict] = []
        total_dets, total_ms = 0, 0.0
        try:
            while ok and frame is not None:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                drawn, record, summary = demo.process(rgb, None)
                logger.debug("%s frame %d: %s", path, len(frames), summary)
                sink.write(drawn)
                frames.append({"frame": len(frames), **record})
                total_dets += len(record["detections"])
                total_ms += record["ms"]
                ok, frame = cap.read()
        finally:
            sink.close()
    finally:
        cap.release()
    out_json.write_text(json.dumps({"video": str(path), "fps": sink.fps, "frames": frames}, indent=1))
    n = len(frames)
    return f"{n} frames, {total_dets} detections, {total_ms / max(n, 1):.0f} ms/frame -> {out_video}"


# -- the command ---------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def run(args) -> int:
    if args.max_dets is not None and args.max_dets < 1:
        raise UsageError(f"--max-dets must be >= 1, got {args.max_dets}")
    if args.fps <= 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    cfg = load_run_config(args.config, args.overrides) if args.config else None
    # Before any tensor work, so that torch's thread pool inherits the mode (see
    # denormals_flushed); on unless --config turns train.flush_denormal off.
    with denormals_flushed(cfg.train.flush_denormal if cfg is not None else True):
        return _run(args, cfg)


def _run(args, cfg) -> int:
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UsageError("no input images")
    video_out = Path(args.video) if args.video else None
    if video_out is not None:
        if video_out.suffix.lower() not in FOURCC:
            raise UsageError(f"--video {video_out}: use a .mp4 or .avi file name")
        if any(_same_file(video_out, p) for p in paths):
            raise UsageError(f"--video {video_out} is one of the inputs")
    predictor = Predictor.from_checkpoint(args.checkpoint, cfg)
    predictor.model.roi_head.score_thresh = args.score_thresh
    if isinstance(predictor.model.proposal_generator, PrecomputedProposals):
        # Proposal files cover their dataset's images only, and the generator has no weights:
        # the demo computes Selective Search on each input instead.
        p = predictor.cfg.model.proposals
        predictor.model.proposal_generator = build_selective_search(
            predictor.cfg.model, predictor.model.backbone, predictor.cfg.data.input
        )
        logger.info(
            "the model reads proposal files (%s), which cover their dataset only: the demo runs Selective Search "
            "(%s mode, model.proposals.selective_search) on each input instead",
            p.precomputed.path,
            p.selective_search.mode,
        )
    gt_index = GroundTruthIndex(predictor.cfg, predictor.class_names) if args.show_gt else None
    demo = Demo(predictor, args, gt_index)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    failed, done = 0, 0
    stems: Dict[str, int] = {}
    sink = FrameSink(video_out, args.fps) if video_out is not None else None
    frame_records: List[dict] = []

    def unique_stem(path: Path) -> str:
        stem = path.stem
        if stem in stems:  # same name in two folders: keep both outputs
            stems[stem] += 1
            return f"{stem}_{stems[stem]}"
        stems[stem] = 0
        return stem

    try:
        for path in paths:
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                stem = unique_stem(path)
                target = out / f"{stem}.mp4"
                if _same_file(target, path):
                    raise UsageError(f"--out {out} holds the input video {path}; choose another folder")
                try:
                    logger.info("%s: %s", path, run_video(demo, path, target, out / f"{stem}.json"))
                    done += 1
                except VideoError as exc:
                    logger.error("skipped %s: %s", path, exc)
                    failed += 1
                continue
            try:
                image = read_image_array(path)
            except ImageReadError as exc:
                logger.error("skipped %s: %s", path, exc)
                failed += 1
                continue
            drawn, record, summary = demo.process(image, path)
            record = {"image": str(path), **record}
            if sink is not None:
                sink.write(drawn)
                frame_records.append({"frame": sink.frames - 1, **record})
                logger.info("%s (frame %d): %s", path, sink.frames - 1, summary)
            else:
                stem = unique_stem(path)
                png = out / f"{stem}.png"
                if _same_file(png, path):
                    raise UsageError(f"--out {out} holds the input images; choose another folder")
                (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
                save_rgb(png, drawn)
                logger.info("%s: %s", path, summary)
            done += 1
    finally:
        if sink is not None:
            sink.close()
    if sink is not None and video_out is not None and sink.frames:
        video_out.with_suffix(".json").write_text(json.dumps({"fps": args.fps, "frames": frame_records}, indent=1))
        logger.info("wrote %d frames to %s", sink.frames, video_out)
    else:
        logger.info("wrote %d results to %s", done, out)
    return 1 if failed else 0

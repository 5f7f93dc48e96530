"""``detkit proposals``: proposal files for a dataset, their recall, and recall plots.

    detkit proposals DATA_OR_CONFIG.yaml --out ss.npz [--method selective_search] [--mode fast]
                     [--workers N] [--limit N] [--split test|train] [--max-proposals 2000]
                     [--eval] [--plot recall.png [--compare rpn.npz ...]] [--overwrite | --reuse]
    detkit proposals CONFIG_OR_DATA.yaml --method rpn --checkpoint model_final.pt --out rpn.npz

Shapes: N images, R proposals of one image, G ground-truth boxes.

- Selective Search runs on each ORIGINAL image (as R-CNN / Fast R-CNN did), in ``--workers``
  processes (spawned), each one single-threaded (a process per core beats threads inside one
  image).
- ``--method rpn`` runs backbone + RPN of a trained checkpoint with the config's test
  transforms (batch 1), post-NMS top-k raised to ``--max-proposals`` (pre-NMS top-k to at
  least that), and maps the boxes back to original pixels (``map_to_original``), so that
  Selective Search and RPN files are comparable (``--compare``).
- Resumable: every finished image goes to ``<out>.partial/`` (chunks of ``--flush-every``
  images, written atomically, also on Ctrl-C / SIGTERM / errors); a rerun with the same
  settings computes only the missing images. The final file is written atomically, then the
  partial folder is removed. An existing ``--out`` is never replaced without ``--overwrite``;
  ``--reuse`` evaluates / plots it as it is.
- ``--eval``: recall at IoU 0.5 and 0.7 and AR (IoU 0.5:0.95) of the top 100/300/1000/2000
  proposals against the non-difficult ground truth; printed and written to
  ``<out stem>.recall.json``. ``--plot PNG``: recall@0.5, recall@0.7 and AR against the
  number of proposals (log x), one curve per file (``--out`` and each ``--compare`` file),
  the Faster R-CNN paper's Selective-Search-vs-RPN comparison on any dataset.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from detkit.data.io import read_image_array
from detkit.evaluation.recall import DEFAULT_IOU_THRESHOLDS, DEFAULT_NUM_PROPOSALS, best_iou_at_counts
from detkit.modeling.proposals.precomputed import (
    PROPOSAL_FILE_VERSION,
    ProposalFileError,
    ProposalTable,
    load_proposals,
    save_proposals,
)
from detkit.modeling.proposals.selective_search import MODES, SelectiveSearchError, selective_search

logger = logging.getLogger("detkit")

METHODS = ("selective_search", "rpn")
SETTINGS_FILE = "settings.json"
FLUSH_SECONDS = 60.0  # a partial chunk is also written after this long, however few images


def _cli_error(message: str) -> Exception:
    from detkit.cli import CLIError  # lazily: detkit.cli imports this module lazily too

    return CLIError(message)


# -- parser ---------------------------------------------------------------------------------
def add_proposals_parser(subparsers, handler) -> None:
    p = subparsers.add_parser(
        "proposals",
        help="compute proposal files (Selective Search or a trained RPN), evaluate recall, plot",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATA_OR_CONFIG", help="dataset YAML or full config (its data.<split>)")
    p.add_argument("--out", required=True, help="proposal file to write (.npz or .json)")
    p.add_argument("--method", choices=METHODS, default="selective_search")
    p.add_argument("--mode", choices=MODES, default="fast", help="Selective Search strategy set (default: fast)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split of a full config")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--workers", type=int, default=1, help="processes for Selective Search (default 1)")
    p.add_argument("--max-proposals", type=int, default=2000, help="proposals kept per image (default 2000)")
    p.add_argument("--min-size", type=float, default=20.0,
                   help="Selective Search: drop boxes narrower/lower than this, original pixels (default 20)")
    p.add_argument("--seed", type=int, default=0, help="Selective Search ranking seed")
    p.add_argument("--checkpoint", help="--method rpn: the trained detector")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="--method rpn")
    p.add_argument("--eval", action="store_true", help="print recall / AR and write <out stem>.recall.json")
    p.add_argument("--plot", metavar="PNG", help="draw recall against the number of proposals")
    p.add_argument("--compare", nargs="+", default=[], metavar="FILE",
                   help="other proposal files to evaluate / plot beside --out")
    p.add_argument("--overwrite", action="store_true", help="recompute and replace an existing --out")
    p.add_argument("--reuse", action="store_true", help="use an existing --out as it is (only --eval / --plot)")
    p.add_argument("--flush-every", type=int, default=20, help="images per partial chunk (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


# -- the partial (resumable) run ------------------------------------------------------------
class PartialRun:
    """``<out>.partial/``: settings.json + chunk_NNNNNN.npz files, each a proposal file of
    the images finished since the previous chunk. Chunks are written atomically, so a crash
    loses at most the unflushed images, and ``flush`` is called on every way out."""

    def __init__(self, out: Path, settings: dict, flush_every: int = 20, discard_mismatch: bool = False):
        self.dir = out.with_name(out.name + ".partial")
        self.settings = settings
        self.flush_every = int(flush_every)
        self.results: ProposalTable = {}
        self.pending: ProposalTable = {}
        self.next_chunk = 0
        self.last_flush = time.monotonic()
        self._open(discard_mismatch)

    def _own_files(self) -> List[Path]:
        return sorted(self.dir.glob("chunk_*.npz")) + sorted(self.dir.glob(".chunk_*.tmp"))

    def _open(self, discard_mismatch: bool) -> None:
        settings_path = self.dir / SETTINGS_FILE
        if self.dir.is_dir() and settings_path.is_file():
            try:
                old = json.loads(settings_path.read_text())
            except (OSError, ValueError):
                old = None
            if old != self.settings:
                diff = ([k for k in sorted(set(self.settings) | set(old)) if old.get(k) != self.settings.get(k)]
                        if isinstance(old, dict) else ["unreadable settings.json"])
                if not discard_mismatch:
                    raise _cli_error(
                        f"{self.dir} holds an interrupted run with other settings ({', '.join(diff)}); "
                        "rerun with the same settings to resume it, or pass --overwrite to discard it")
                logger.warning("discarding %s (other settings: %s)", self.dir, ", ".join(diff))
                self.remove()
        elif self.dir.exists() and not self.dir.is_dir():
            raise _cli_error(f"{self.dir} exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not settings_path.is_file():
            settings_path.write_text(json.dumps(self.settings, indent=1))
        for chunk in sorted(self.dir.glob("chunk_*.npz")):
            try:
                table, _ = load_proposals(chunk)
            except ProposalFileError as exc:  # only possible if edited by hand: recompute those
                logger.warning("ignoring %s", exc)
                continue
            self.results.update(table)
            self.next_chunk = max(self.next_chunk, int(chunk.stem.split("_")[1]) + 1)

    def add(self, image_id: str, boxes: np.ndarray, scores: np.ndarray) -> None:
        self.results[image_id] = self.pending[image_id] = (boxes, scores)
        if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            save_proposals(self.dir / f"chunk_{self.next_chunk:06d}.npz", self.pending, {"partial": True})
            self.next_chunk += 1
            self.pending = {}
        self.last_flush = time.monotonic()

    def remove(self) -> None:
        """Delete what this class wrote (chunks, settings.json), then the folder if empty."""
        for path in self._own_files() + [self.dir / SETTINGS_FILE]:
            if path.exists():
                path.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            if self.dir.exists():
                logger.warning("left %s in place: it holds files detkit did not write", self.dir)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the partial chunk is flushed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- Selective Search over a dataset ---------------------------------------------------------
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def _single_threaded_env():
    """Thread-count variables set to 1 while worker processes start: the libraries read
    them once, at import, before any initializer could run."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: "1" for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_worker() -> None:
    """One thread per worker process: the parallelism is across images."""
    # The parent handles Ctrl-C (and flushes); the pool's terminate() sends SIGTERM, which
    # must simply end a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _ss_task(task) -> Tuple[str, np.ndarray, np.ndarray, float]:
    image_id, file_name, mode, max_proposals, min_size, seed = task
    image = read_image_array(file_name)
    start = time.perf_counter()
    try:
        boxes, scores = selective_search(image, mode, min_size=min_size, max_boxes=max_proposals, seed=seed)
    except SelectiveSearchError as exc:
        raise _cli_error(f"selective search failed on {file_name}: {exc}") from None
    return image_id, boxes, scores, time.perf_counter() - start


def _run_selective_search(records, args, partial: PartialRun) -> float:
    """-> seconds of Selective Search per image (summed over workers)."""
    from tqdm import tqdm

    tasks = [(str(r.image_id), r.file_name, args.mode, args.max_proposals, args.min_size, args.seed)
             for r in records]
    pool = None
    if args.workers > 1 and len(tasks) > 1:
        # spawn, not fork: a process forked while another thread of the parent (torch's
        # OpenMP pool, a progress bar, a logging handler) holds a lock can deadlock on it.
        # Fresh interpreters cost a second or two of imports each, once per run.
        with _single_threaded_env():
            pool = mp.get_context("spawn").Pool(min(args.workers, len(tasks)), initializer=_init_worker)
        results = pool.imap_unordered(_ss_task, tasks, chunksize=1)
    else:
        results = map(_ss_task, tasks)
    seconds = 0.0
    try:
        bar = tqdm(results, total=len(tasks), desc=f"selective search ({args.mode})", unit="img",
                   disable=True if args.no_progress else None, dynamic_ncols=True)
        for image_id, boxes, scores, sec in bar:
            partial.add(image_id, boxes, scores)
            seconds += sec
    finally:
        partial.flush()
        if pool is not None:
            pool.terminate()
            pool.join()
    return seconds / max(len(tasks), 1)


# -- RPN over a dataset ----------------------------------------------------------------------
def _run_rpn(records, dataset, model, device, args, partial: PartialRun) -> float:
    """-> seconds per image (backbone + RPN, data loading excluded)."""
    import torch
    from tqdm import tqdm

    from detkit.data.loader import build_test_loader
    from detkit.modeling.detector import map_to_original
    from detkit.structures import Detections

    indices = [dataset.id_to_index[r.image_id] for r in records]
    loader = build_test_loader(dataset, 1, args.workers if args.workers > 1 else 0, model.size_divisibility,
                               indices=indices)
    seconds = 0.0
    try:
        with torch.no_grad():
            for images, _ in tqdm(loader, total=len(indices), desc="rpn", unit="img",
                                  disable=True if args.no_progress else None, dynamic_ncols=True):
                images = images.to(device)
                start = time.perf_counter()
                features = model.backbone(images.tensor)
                proposals, _ = model.proposal_generator(images, features)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                as_dets = [Detections(p.boxes, p.scores, torch.zeros(len(p), dtype=torch.int64)) for p in proposals]
                for det, image_id, (oh, ow) in zip(map_to_original(as_dets, images), images.image_ids,
                                                   images.orig_sizes):
                    boxes = det.boxes.float().cpu().numpy()
                    # float rounding of the rescale may step a clipped box past the border
                    np.clip(boxes[:, 0::2], 0, ow, out=boxes[:, 0::2])
                    np.clip(boxes[:, 1::2], 0, oh, out=boxes[:, 1::2])
                    partial.add(str(image_id), boxes, det.scores.float().cpu().numpy())
    finally:
        partial.flush()
    return seconds / max(len(indices), 1)


def _load_rpn_model(args, full_config: bool):
    from detkit.build import dataset_transforms
    from detkit.cli import load_run_config
    from detkit.engine.inference import device_from_config
    from detkit.engine.predictor import model_from_checkpoint
    from detkit.modeling.proposals.rpn import RPN

    cfg = load_run_config(args.dataset, []) if full_config else None
    try:
        device = device_from_config(args.device)
    except RuntimeError as exc:
        raise _cli_error(str(exc)) from None
    model, cfg, _ = model_from_checkpoint(args.checkpoint, cfg, device)
    gen = model.proposal_generator
    if not isinstance(gen, RPN):
        raise _cli_error(f"{args.checkpoint}: the model's proposal generator is "
                         f"{type(gen).__name__}, not an RPN")
    # More proposals than the config's test top-k, for this run only; pre-NMS (per level)
    # at least as many, or a single-level RPN could never reach the post-NMS count.
    gen.post_nms_topk = (gen.post_nms_topk[0], args.max_proposals)
    gen.pre_nms_topk = (gen.pre_nms_topk[0], max(gen.pre_nms_topk[1], args.max_proposals))
    return model, device, dataset_transforms(cfg.data.input, train=False)


# -- evaluation and plots --------------------------------------------------------------------
def _sorted_boxes(table: ProposalTable, image_id) -> np.ndarray:
    boxes, scores = table[str(image_id)]
    return boxes[np.argsort(-scores, kind="stable")]


def _proposals_for(table: ProposalTable, records, path) -> List[np.ndarray]:
    missing = [r.image_id for r in records if str(r.image_id) not in table]
    if missing:
        raise ProposalFileError(f"proposal file {path} has no proposals for {len(missing)} of the "
                                f"{len(records)} images evaluated (first: {str(missing[0])!r})")
    return [_sorted_boxes(table, r.image_id) for r in records]


def _label(meta: dict, path: Path) -> str:
    method = meta.get("method")
    if method == "selective_search":
        return f"Selective Search ({meta['mode']})" if meta.get("mode") else "Selective Search"
    if method == "rpn":
        return f"RPN ({meta['checkpoint']})" if meta.get("checkpoint") else "RPN"
    return path.stem


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def recall_summary(gt: Sequence[np.ndarray], proposals: Sequence[np.ndarray],
                   counts: Sequence[int] = DEFAULT_NUM_PROPOSALS) -> dict:
    """{"num_gt", "mean_proposals", "recall": {N: {"0.5": r, "0.7": r}}, "AR": {N: ar}}
    (string keys, NaN as None: ready for JSON)."""
    from detkit.evaluation.recall import proposal_recall

    res = proposal_recall(gt, proposals, counts)
    return {
        "num_gt": res["num_gt"],
        "mean_proposals": float(np.mean([len(p) for p in proposals])) if len(proposals) else 0.0,
        "recall": {str(n): {str(t): _nan_to_none(res["recall"][n][t]) for t in (0.5, 0.7)} for n in counts},
        "AR": {str(n): _nan_to_none(res["AR"][n]) for n in counts},
    }


def format_recall(name: str, summary: dict, num_images: int) -> str:
    def f(v):
        return "   n/a" if v is None else f"{v:.4f}"

    lines = [f"{name}: {num_images} images, {summary['num_gt']} ground-truth boxes, "
             f"{summary['mean_proposals']:.1f} proposals/image",
             f"{'N':>6}  {'R@0.5':>6}  {'R@0.7':>6}  {'AR':>6}"]
    for n, r in summary["recall"].items():
        lines.append(f"{n:>6}  {f(r['0.5'])}  {f(r['0.7'])}  {f(summary['AR'][n])}")
    return "\n".join(lines)


def plot_recall(curves: Sequence[Tuple[str, Sequence[np.ndarray]]], gt: Sequence[np.ndarray], path) -> Path:
    """curves: (label, proposals per image sorted best first) per method -> a PNG with
    recall@0.5, recall@0.7 and AR (IoU 0.5:0.95) against the number of proposals (log x)."""
    from matplotlib.figure import Figure

    most = max([len(p) for _, props in curves for p in props] + [1])
    counts = np.unique(np.round(np.logspace(0, math.log10(most), 40)).astype(np.int64))
    thresholds = np.round(DEFAULT_IOU_THRESHOLDS, 6)
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for label, props in curves:
        best = best_iou_at_counts(gt, props, counts)  # (G, C)
        if best.shape[0] == 0:
            continue
        r5 = (best >= 0.5).mean(axis=0)
        r7 = (best >= 0.7).mean(axis=0)
        ar = (best[:, :, None] >= thresholds[None, None, :]).mean(axis=(0, 2))
        for ax, y in zip(axes, (r5, r7, ar)):
            ax.plot(counts, y, label=label)
    for ax, title in zip(axes, ("recall at IoU 0.5", "recall at IoU 0.7", "average recall (IoU 0.5:0.95)")):
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="number of proposals", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[0].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def recall_path(out: Path) -> Path:
    return out.with_name(out.stem + ".recall.json")


# -- the command -------------------------------------------------------------------------------
def _is_full_config(path: str) -> bool:
    from detkit.config import load_yaml

    data, _ = load_yaml(path)
    return isinstance(data, dict) and "data" in data


def _check_args(args) -> Path:
    out = Path(args.out)
    if out.suffix.lower() not in (".npz", ".json"):
        raise _cli_error(f"--out {out}: use a .npz or .json file name")
    for name in ("limit", "workers", "max_proposals", "flush_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _cli_error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.method == "rpn" and not args.checkpoint and not args.reuse:
        raise _cli_error("--method rpn needs --checkpoint")
    if args.checkpoint and args.method != "rpn":
        raise _cli_error("--checkpoint is only used with --method rpn")
    if args.checkpoint and not args.reuse and not Path(args.checkpoint).is_file():
        raise _cli_error(f"checkpoint not found: {args.checkpoint}")
    if args.overwrite and args.reuse:
        raise _cli_error("--overwrite and --reuse contradict each other")
    if args.compare and not (args.eval or args.plot):
        raise _cli_error("--compare needs --eval or --plot")
    if out.exists() and not (args.overwrite or args.reuse):
        raise _cli_error(f"{out} exists; pass --overwrite to recompute it or --reuse to evaluate/plot it as is")
    if args.reuse and not out.is_file():
        raise _cli_error(f"--reuse: {out} does not exist")
    for other in args.compare:
        if not Path(other).is_file():
            raise _cli_error(f"--compare: proposal file not found: {other}")
    return out


def _dataset_settings(ds_cfg) -> dict:
    return {k: getattr(ds_cfg, k) for k in ("format", "root", "split", "ann_dir", "img_dir", "split_file",
                                             "ann_file", "holdout", "seed") if getattr(ds_cfg, k, None) is not None}


def _checkpoint_settings(path: str) -> dict:
    st = os.stat(path)
    # size + mtime: a checkpoint retrained at the same path must not resume the old run
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_proposals_command(args) -> int:
    from detkit.build import build_dataset
    from detkit.cli import load_dataset_yaml

    out = _check_args(args)
    ds_cfg, classes = load_dataset_yaml(args.dataset, which=args.split)
    full_config = _is_full_config(args.dataset)
    dataset = build_dataset(ds_cfg, classes)
    records = dataset.records[: args.limit] if args.limit else list(dataset.records)
    if not records:
        raise _cli_error(f"{args.dataset}: the dataset has no images")

    if args.reuse:
        table, meta = load_proposals(out)
        kept = [r for r in records if str(r.image_id) in table]
        if len(kept) < len(records):
            logger.info("%s covers %d of the %d images selected: evaluating those", out, len(kept), len(records))
        records = kept
        if not records:
            raise ProposalFileError(f"proposal file {out} has no proposals for any image of {dataset.name}")
    else:
        table, meta = _compute(args, out, ds_cfg, dataset, records, full_config)

    if args.eval or args.plot:
        _evaluate_and_plot(args, out, table, meta, records)
    return 0


def _compute(args, out: Path, ds_cfg, dataset, records, full_config: bool):
    settings = {"method": args.method, "max_proposals": args.max_proposals, "dataset": _dataset_settings(ds_cfg)}
    meta = {"method": args.method, "dataset": dataset.name, "max_proposals": args.max_proposals,
            "coordinates": "xyxy, continuous pixels of the original image"}
    model = device = None
    if args.method == "selective_search":
        settings.update(mode=args.mode, min_size=args.min_size, seed=args.seed)
        meta.update(mode=args.mode, min_size=args.min_size, seed=args.seed)
    else:
        settings["checkpoint"] = _checkpoint_settings(args.checkpoint)
        settings["config"] = str(Path(args.dataset).resolve()) if full_config else None
        meta["checkpoint"] = Path(args.checkpoint).name
        model, device, transforms = _load_rpn_model(args, full_config)
        dataset.transforms = transforms

    partial = PartialRun(out, settings, args.flush_every, discard_mismatch=args.overwrite)
    todo = [r for r in records if str(r.image_id) not in partial.results]
    if len(todo) < len(records):
        logger.info("resuming %s: %d of %d images done, %d to go", partial.dir, len(records) - len(todo),
                    len(records), len(todo))
    start = time.perf_counter()
    sec_per_image = 0.0
    if todo:
        with _sigterm_as_interrupt():
            if args.method == "selective_search":
                sec_per_image = _run_selective_search(todo, args, partial)
            else:
                sec_per_image = _run_rpn(todo, dataset, model, device, args, partial)
        wall = time.perf_counter() - start
        logger.info("%d images in %.1f s (%.3f s/image of %s, %d worker%s)", len(todo), wall, sec_per_image,
                    args.method, args.workers, "s" if args.workers > 1 else "")
    table = {str(r.image_id): partial.results[str(r.image_id)] for r in records}
    meta.update(num_images=len(table), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if todo:
        meta["seconds_per_image"] = round(sec_per_image, 4)
    save_proposals(out, table, meta)
    partial.remove()
    logger.info("wrote %s: %d images, %.1f proposals/image", out, len(table),
                np.mean([len(b) for b, _ in table.values()]))
    return table, {**meta, "version": PROPOSAL_FILE_VERSION}


def _evaluate_and_plot(args, out: Path, table, meta, records) -> None:
    gt = [r.boxes[~r.difficult] for r in records]
    files = [(out, table, meta)]
    for other in args.compare:
        t, m = load_proposals(other)
        files.append((Path(other), t, m))
    labels, curves = [], []
    for path, t, m in files:
        label = _label(m, path)
        if label in labels:
            label = f"{label} [{path.name}]"
        labels.append(label)
        curves.append((label, _proposals_for(t, records, path)))
    if args.eval:
        results = []
        for (path, _, m), (label, props) in zip(files, curves):
            summary = recall_summary(gt, props)
            print(format_recall(f"{label} ({path.name})", summary, len(records)))
            results.append({"file": str(path), "label": label, "meta": m, "num_images": len(records), **summary})
        doc = {**results[0], "compare": results[1:]} if len(results) > 1 else results[0]
        target = recall_path(out)
        target.write_text(json.dumps(doc, indent=1))
        logger.info("wrote %s", target)
    if args.plot:
        written = plot_recall(curves, gt, args.plot)
        logger.info("wrote %s", written)

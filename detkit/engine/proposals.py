"""Proposal dumps over a dataset (the engine side of ``detkit proposals``): Selective Search
in a pool of worker processes, or the RPN of a trained detector, written to a proposal file
(``detkit.data.proposal_files``) through a resumable partial run.

Shapes: N images, R proposals of one image.

- Selective Search runs on each ORIGINAL image (as R-CNN / Fast R-CNN did), in ``workers``
  processes (spawned), each one single-threaded (a process per core beats threads inside one
  image).
- The RPN dump runs backbone + RPN of a trained checkpoint with the config's test
  transforms (batch 1), post-NMS top-k raised to ``max_proposals`` (pre-NMS top-k to at
  least that), and maps the boxes back to original pixels (``Geometry.invert``), so that
  Selective Search and RPN files are comparable.
- Resumable: every finished image goes to ``<out>.partial/`` (chunks of ``flush_every``
  images, written atomically, also on Ctrl-C / SIGTERM / errors); a rerun with the same
  settings computes only the missing images. The final file is written atomically, then the
  partial folder is removed.
- Distributed (torchrun, ``detkit.engine.distributed``): rank 0 reads the partial run and
  decides which images are left; each rank computes its share of them (Selective Search
  still in ``workers`` processes per rank, the RPN on its own GPU) and hands its results to
  rank 0 in rounds of ``flush_every`` images, which rank 0 writes as chunks; rank 0 alone
  writes, so a restarted job (any number of processes) resumes from those chunks.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from detkit.data.build import dataset_transforms
from detkit.data.io import read_image_array
from detkit.data.loader import build_test_loader
from detkit.data.proposal_files import PROPOSAL_FILE_VERSION, ProposalTable, load_proposals, save_proposals
from detkit.engine import distributed
from detkit.engine.inference import device_from_config
from detkit.engine.predictor import model_from_checkpoint
from detkit.errors import ConfigError, ProposalFileError, SelectiveSearchError, UsageError
from detkit.evaluation.recall import format_recall, plot_recall, recall_summary
from detkit.modeling.proposals.rpn import RPN
from detkit.modeling.proposals.selective_search import selective_search
from detkit.schema import Config

logger = logging.getLogger("detkit")

METHODS = ("selective_search", "rpn")
SETTINGS_FILE = "settings.json"
FLUSH_SECONDS = 60.0  # a partial chunk is also written after this long, however few images


@dataclass
class ProposalJob:
    """What to compute: ``method`` selective_search (``mode``, ``min_size`` in original
    pixels, ranking ``seed``) or rpn (``checkpoint``, optional run ``config`` path); at most
    ``max_proposals`` per image; ``workers`` processes (Selective Search) or loader workers
    (RPN); a partial chunk every ``flush_every`` images."""

    method: str = "selective_search"
    mode: str = "fast"
    max_proposals: int = 2000
    min_size: float = 20.0
    seed: int = 0
    workers: int = 1
    flush_every: int = 20
    progress: bool = True
    checkpoint: Optional[str] = None
    config: Optional[str] = None
    dataset_settings: Dict = field(default_factory=dict)


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
                diff = (
                    [k for k in sorted(set(self.settings) | set(old)) if old.get(k) != self.settings.get(k)]
                    if isinstance(old, dict)
                    else ["unreadable settings.json"]
                )
                if not discard_mismatch:
                    raise UsageError(
                        f"{self.dir} holds an interrupted run with other settings ({', '.join(diff)}); "
                        "rerun with the same settings to resume it, or pass --overwrite to discard it"
                    )
                logger.warning("discarding %s (other settings: %s)", self.dir, ", ".join(diff))
                self.remove()
        elif self.dir.exists() and not self.dir.is_dir():
            raise UsageError(f"{self.dir} exists and is not a folder")
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
        raise UsageError(f"selective search failed on {file_name}: {exc}") from None
    return image_id, boxes, scores, time.perf_counter() - start


# add(image_id, boxes, scores): where a computed image goes (the partial run, or the round
# gatherer of a distributed dump).
AddResult = Callable[[str, np.ndarray, np.ndarray], None]


def _run_selective_search(records, job: "ProposalJob", add: AddResult) -> float:
    """-> seconds of Selective Search per image (summed over workers)."""
    tasks = [(str(r.image_id), r.file_name, job.mode, job.max_proposals, job.min_size, job.seed) for r in records]
    pool = None
    results: Iterator[Tuple[str, np.ndarray, np.ndarray, float]]
    if job.workers > 1 and len(tasks) > 1:
        # spawn, not fork: a process forked while another thread of the parent (torch's
        # OpenMP pool, a progress bar, a logging handler) holds a lock can deadlock on it.
        # Fresh interpreters cost a second or two of imports each, once per run.
        with _single_threaded_env():
            pool = mp.get_context("spawn").Pool(min(job.workers, len(tasks)), initializer=_init_worker)
        results = pool.imap_unordered(_ss_task, tasks, chunksize=1)
    else:
        results = map(_ss_task, tasks)
    seconds = 0.0
    try:
        bar = tqdm(
            results,
            total=len(tasks),
            desc=f"selective search ({job.mode})",
            unit="img",
            disable=None if job.progress else True,
            dynamic_ncols=True,
        )
        for image_id, boxes, scores, sec in bar:
            add(image_id, boxes, scores)
            seconds += sec
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return seconds / max(len(tasks), 1)


# -- RPN over a dataset ----------------------------------------------------------------------
def _run_rpn(records, dataset, model, device, job: "ProposalJob", add: AddResult) -> float:
    """-> seconds per image (backbone + RPN, data loading excluded)."""
    indices = [dataset.id_to_index[r.image_id] for r in records]
    loader = build_test_loader(
        dataset, 1, job.workers if job.workers > 1 else 0, model.size_divisibility, indices=indices
    )
    seconds = 0.0
    with torch.no_grad():
        for images, _ in tqdm(
            loader,
            total=len(indices),
            desc="rpn",
            unit="img",
            disable=None if job.progress else True,
            dynamic_ncols=True,
        ):
            images = images.to(device)
            start = time.perf_counter()
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            for i, (props, image_id) in enumerate(zip(proposals, images.image_ids)):
                geometry = images.geometry(i)
                oh, ow = geometry.orig_size
                boxes = geometry.invert(props.boxes).float().cpu().numpy()
                # float rounding of the rescale may step a clipped box past the border
                np.clip(boxes[:, 0::2], 0, ow, out=boxes[:, 0::2])
                np.clip(boxes[:, 1::2], 0, oh, out=boxes[:, 1::2])
                add(str(image_id), boxes, props.scores.float().cpu().numpy())
    return seconds / max(len(indices), 1)


def load_rpn_model(checkpoint, cfg=None, device: Union[str, torch.device] = "auto", max_proposals: int = 2000):
    """-> (model in eval mode, torch device, the config's test transforms) for dumping the RPN
    proposals of a trained detector. ``cfg``: a Config that overrides the checkpoint's. The
    RPN keeps ``max_proposals`` per image after NMS (for this use only), and at least as
    many before NMS per level, or a single-level RPN could never reach the post-NMS count."""
    dev = device if isinstance(device, torch.device) else device_from_config(device, key="--device")
    model, cfg, _ = model_from_checkpoint(checkpoint, cfg, dev)
    gen = model.proposal_generator
    if not isinstance(gen, RPN):
        raise UsageError(f"{checkpoint}: the model's proposal generator is {type(gen).__name__}, not an RPN")
    gen.post_nms_topk = (gen.post_nms_topk[0], max_proposals)
    gen.pre_nms_topk = (gen.pre_nms_topk[0], max(gen.pre_nms_topk[1], max_proposals))
    return model, dev, dataset_transforms(cfg.data.input, train=False)


# -- the whole dump ------------------------------------------------------------------------
def _checkpoint_settings(path: str) -> dict:
    st = os.stat(path)
    # size + mtime: a checkpoint retrained at the same path must not resume the old run
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def compute_proposals(
    out: Path, dataset, records, job: ProposalJob, overwrite: bool = False, rpn_model=None
) -> Tuple[ProposalTable, dict]:
    """Proposals for ``records`` (of ``dataset``) written to ``out``; resumes a partial run
    with the same settings. ``rpn_model``: (model, device, test transforms) from
    ``load_rpn_model`` for ``job.method == "rpn"``. -> (table, meta)."""
    out = Path(out)
    settings = {"method": job.method, "max_proposals": job.max_proposals, "dataset": job.dataset_settings}
    meta = {
        "method": job.method,
        "dataset": dataset.name,
        "max_proposals": job.max_proposals,
        "coordinates": "xyxy, continuous pixels of the original image",
    }
    model = device = None
    if job.method == "selective_search":
        settings.update(mode=job.mode, min_size=job.min_size, seed=job.seed)
        meta.update(mode=job.mode, min_size=job.min_size, seed=job.seed)
    elif job.method == "rpn":
        if rpn_model is None or job.checkpoint is None:
            raise UsageError("RPN proposals need a checkpoint (--checkpoint)")
        settings["checkpoint"] = _checkpoint_settings(job.checkpoint)
        settings["config"] = str(Path(job.config).resolve()) if job.config else None
        meta["checkpoint"] = Path(job.checkpoint).name
        model, device, transforms = rpn_model
        dataset.transforms = transforms
    else:
        raise UsageError(f"unknown proposal method {job.method!r} (use {', '.join(METHODS)})")

    # The partial run lives on rank 0, which decides what is left to do (for every rank).
    opened: List[PartialRun] = []

    def plan() -> List[str]:
        opened.append(PartialRun(out, settings, job.flush_every, discard_mismatch=overwrite))
        return [str(r.image_id) for r in records if str(r.image_id) not in opened[0].results]

    left = set(distributed.on_main(plan, f"reading {out.name}.partial"))
    todo = [r for r in records if str(r.image_id) in left]
    partial = opened[0] if opened else None
    if partial is not None and len(todo) < len(records):
        logger.info(
            "resuming %s: %d of %d images done, %d to go",
            partial.dir,
            len(records) - len(todo),
            len(records),
            len(todo),
        )
    start = time.perf_counter()
    sec_per_image = 0.0
    if todo:
        with _sigterm_as_interrupt():
            sec_per_image = _compute(todo, dataset, model, device, job, partial)
        wall = time.perf_counter() - start
        processes = distributed.world_size()
        logger.info(
            "%d images in %.1f s (%.3f s/image of %s, %d worker%s%s)",
            len(todo),
            wall,
            sec_per_image,
            job.method,
            job.workers,
            "s" if job.workers > 1 else "",
            f" in each of {processes} processes" if processes > 1 else "",
        )
    if partial is None:  # not rank 0: its images are in rank 0's chunks
        return {}, {**meta, "version": PROPOSAL_FILE_VERSION}
    table = {str(r.image_id): partial.results[str(r.image_id)] for r in records}
    meta.update(num_images=len(table), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if todo:
        meta["seconds_per_image"] = round(sec_per_image, 4)
    save_proposals(out, table, meta)
    partial.remove()
    logger.info(
        "wrote %s: %d images, %.1f proposals/image", out, len(table), np.mean([len(b) for b, _ in table.values()])
    )
    return table, {**meta, "version": PROPOSAL_FILE_VERSION}


def _compute(todo, dataset, model, device, job: ProposalJob, partial: Optional[PartialRun]) -> float:
    """Proposals of ``todo`` into ``partial`` (rank 0's; None on the other ranks) -> compute
    seconds per image. One process: straight into the partial run (a chunk every
    ``flush_every`` images or FLUSH_SECONDS). Several: this rank's share, handed to rank 0
    in rounds of ``flush_every`` images per rank, each round one chunk."""

    def run(records, add: AddResult) -> float:
        if job.method == "selective_search":
            return _run_selective_search(records, job, add)
        return _run_rpn(records, dataset, model, device, job, add)

    if not distributed.is_distributed():
        assert partial is not None
        try:
            return run(todo, partial.add)
        finally:
            partial.flush()

    def write(results) -> None:  # rank 0, after each round: one chunk
        assert partial is not None
        for image_id, boxes, scores in results:
            partial.add(image_id, boxes, scores)
        partial.flush()

    mine = distributed.shard(todo)
    with distributed.RoundGatherer(len(todo), job.flush_every, write, "proposals") as gather:
        seconds = run(mine, lambda image_id, boxes, scores: gather.add((image_id, boxes, scores)))
    total = distributed.all_reduce_sum([seconds * len(mine)], "summing the proposal times")[0]
    return total / len(todo)


# -- recall of proposal files -----------------------------------------------------------------
def _sorted_boxes(table: ProposalTable, image_id) -> np.ndarray:
    boxes, scores = table[str(image_id)]
    return boxes[np.argsort(-scores, kind="stable")]


def proposals_for(table: ProposalTable, records, path) -> List[np.ndarray]:
    """Per record its boxes, best first; an image missing from the file is an error."""
    missing = [r.image_id for r in records if str(r.image_id) not in table]
    if missing:
        raise ProposalFileError(
            f"proposal file {path} has no proposals for {len(missing)} of the "
            f"{len(records)} images evaluated (first: {str(missing[0])!r})"
        )
    return [_sorted_boxes(table, r.image_id) for r in records]


def file_label(meta: dict, path: Path) -> str:
    method = meta.get("method")
    if method == "selective_search":
        return f"Selective Search ({meta['mode']})" if meta.get("mode") else "Selective Search"
    if method == "rpn":
        return f"RPN ({meta['checkpoint']})" if meta.get("checkpoint") else "RPN"
    return path.stem


def recall_path(out: Path) -> Path:
    return out.with_name(out.stem + ".recall.json")


def evaluate_proposal_files(
    files: Sequence[Tuple[Path, ProposalTable, dict]],
    records,
    recall_json: Optional[Path] = None,
    plot: Optional[Path] = None,
) -> List[dict]:
    """Recall / AR of each (path, table, meta) against the records' non-difficult ground
    truth: printed, written to ``recall_json`` (the first file's summary, the others under
    "compare") and drawn into ``plot``. -> the summaries."""
    gt = [r.boxes[~r.difficult] for r in records]
    labels: List[str] = []
    curves = []
    for path, t, m in files:
        label = file_label(m, path)
        if label in labels:
            label = f"{label} [{path.name}]"
        labels.append(label)
        curves.append((label, proposals_for(t, records, path)))
    results = []
    if recall_json is not None:
        for (path, _, m), (label, props) in zip(files, curves):
            summary = recall_summary(gt, props)
            print(format_recall(f"{label} ({path.name})", summary, len(records)))
            results.append({"file": str(path), "label": label, "meta": m, "num_images": len(records), **summary})
        doc = {**results[0], "compare": results[1:]} if len(results) > 1 else results[0]
        recall_json.write_text(json.dumps(doc, indent=1))
        logger.info("wrote %s", recall_json)
    if plot is not None:
        written = plot_recall(curves, gt, plot)
        logger.info("wrote %s", written)
    return results


# -- proposal files a config needs -----------------------------------------------------------
def _split_of(path: Path, index: int, count: int) -> str:
    """The split a proposal file is for: from a train / trainval / test / val word in its name,
    else its place in the list ([train file, test file])."""
    words = set(re.split(r"[^a-z]+", path.stem.lower()))
    if words & {"test", "val"}:
        return "test"
    if words & {"train", "trainval"}:
        return "train"
    return "test" if count > 1 and index == count - 1 else "train"


def proposal_command(config_path, cfg: Config, path, split: str) -> str:
    """The ``detkit proposals`` command that writes ``path`` for ``split`` of the config, with
    the settings of ``model.proposals.selective_search``; a file with ``rpn`` in its name gets
    the RPN dump of a trained Faster R-CNN (its own config and checkpoint, named as placeholders)."""
    ss = cfg.model.proposals.selective_search
    if "rpn" in set(re.split(r"[^a-z]+", Path(path).stem.lower())):
        return (
            f"detkit proposals FASTER_RCNN_CONFIG --split {split} --method rpn --checkpoint "
            f"FASTER_RCNN_RUN/model_final.pt --max-proposals {cfg.model.proposals.precomputed.max_proposals} "
            f"--out {shlex.quote(str(path))}"
        )
    args = [
        "detkit proposals",
        shlex.quote(str(config_path)),
        f"--split {split}",
        f"--mode {ss.mode}",
        f"--min-size {ss.min_size:g}",
        f"--max-proposals {ss.max_proposals}",
        "--workers 2",
        f"--out {shlex.quote(str(path))}",
    ]
    return " ".join(args)


def check_proposal_files(cfg: Config, config_path) -> None:
    """With ``model.proposals.method: precomputed``: every file must exist; otherwise one
    ConfigError line naming each missing file and the exact command that makes it."""
    if cfg.model.proposals.method != "precomputed":
        return
    paths = cfg.model.proposals.precomputed.path
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    missing = [(i, Path(p)) for i, p in enumerate(paths) if not Path(p).is_file()]
    if not missing:
        return
    commands = " && ".join(proposal_command(config_path, cfg, p, _split_of(p, i, len(paths))) for i, p in missing)
    names = ", ".join(str(p) for _, p in missing)
    raise ConfigError(
        f"model.proposals.precomputed.path: proposal file{'s' if len(missing) > 1 else ''} {names} not found; "
        f"make {'them' if len(missing) > 1 else 'it'} with: {commands}"
    )

"""Running a detector over a dataset: detections in original pixels (+ validation losses).

Output format (the evaluation package's ``Dets``): image_id -> dict(boxes (R, 4) float32
xyxy in original image pixels, scores (R,), labels (R,) in 1..K), numpy arrays.

An image that cannot be read is skipped with a warning naming the file, and counted; it
gets no detections, so its ground truth counts as missed by the metrics (the mAP is then a
lower bound of what the model would score on the full test set).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from tqdm import tqdm

from detkit.data.loader import SkippedImages, build_test_loader
from detkit.errors import ConfigError

logger = logging.getLogger("detkit")


def _denormals_flushed_now() -> bool:
    """Whether this thread treats subnormal floats as zero (torch has no getter: probe it).
    With flush-to-zero / denormals-are-zero on, a subnormal input multiplies to 0."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal: below 1.18e-38
    return float(tiny * 1.0) == 0.0


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Within the block, subnormal floats (0 < |x| < 1.2e-38) are treated as zero on the CPU
    (``torch.set_flush_denormal``); the previous setting is restored afterwards.

    Why: many x86 CPUs compute with subnormals far slower than with normal floats, and
    training produces them (tiny gradients, activations, momentum terms): on an unseen
    one-class dataset a CPU run slowed from 2.5 to 5.7 s/iter after about 20 iterations, and
    flushing brought it back with the identical mAP at iteration 40.

    The mode is a per-thread CPU flag: it holds for this thread and for the threads started
    inside the block (torch's intra-op thread pool is started on first use and inherits it),
    not for pool threads that already exist. The command line therefore enters this block
    right after reading the config, before any tensor work starts the pool. A no-op where the
    CPU has no such mode.
    """
    if not enabled:
        yield
        return
    before = _denormals_flushed_now()
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported and not before:
            torch.set_flush_denormal(False)


def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when enabled; a no-op elsewhere (CPU autocast is slower here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def run_inference(
    model,
    dataset,
    batch_size: int = 1,
    device=None,
    num_workers: int = 0,
    compute_losses: bool = False,
    amp: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> Tuple[Dict, Dict[str, float], float]:
    """-> (detections per image id, mean validation loss per term ({} unless
    ``compute_losses``), seconds per image). Unreadable images are skipped (see the module
    doc)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = build_test_loader(dataset, batch_size, num_workers, model.size_divisibility, skip_unreadable=True)
    skipped = SkippedImages(desc, "it gets no detections: its ground truth counts as missed")
    dets: Dict = {}
    loss_sums: Dict[str, float] = defaultdict(float)
    batches = 0
    start = time.perf_counter()
    try:
        # disable=None: a bar only on a terminal (no progress spam in logs).
        bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
        for batch in bar:
            images, targets = batch
            skipped.add(batch.skipped)
            if images is None:
                continue
            images = images.to(device)
            with autocast_context(device, amp):
                detections, losses = model(images, targets if compute_losses else None)
            for det, image_id in zip(detections, images.image_ids):
                dets[image_id] = {
                    "boxes": det.boxes.float().cpu().numpy(),
                    "scores": det.scores.float().cpu().numpy(),
                    "labels": det.labels.cpu().numpy().astype(np.int64),
                }
            for k, v in losses.items():
                loss_sums[k] += float(v)
            batches += 1
    finally:
        model.train(was_training)
    if skipped:
        logger.warning(
            "%s: %d of %d images could not be read and were skipped; their ground truth counts as missed",
            desc,
            len(skipped),
            len(dataset),
        )
    seconds = (time.perf_counter() - start) / max(len(dataset), 1)
    return dets, {k: v / max(batches, 1) for k, v in loss_sums.items()}, seconds


def device_from_config(name: str, key: str = "train.device") -> torch.device:
    """auto | cpu | cuda -> a torch device; ``key`` names the setting in the error (a config
    key, or a command-line option such as ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' requested but CUDA is not available (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)

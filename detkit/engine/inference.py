"""Running a detector over a dataset: detections in original pixels (+ validation losses).

Output format (the evaluation package's ``Dets``): image_id -> dict(boxes (R, 4) float32
xyxy in original image pixels, scores (R,), labels (R,) in 1..K), numpy arrays.

An image that cannot be read is skipped with a warning naming the file, and counted; it
gets no detections, so its ground truth counts as missed by the metrics (the mAP is then a
lower bound of what the model would score on the full test set).

In a distributed run (torchrun) ``run_inference(..., sharded=True)`` splits the pass across
the ranks by whole test batches and gathers the detections on rank 0: the same detections,
and so the same mAP, as one process computes. Mixed precision: ``amp_dtype`` /
``autocast_context`` (bfloat16 or float16 on CUDA; bfloat16 on the CPU when asked for).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections import defaultdict
from dataclasses import replace
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from detkit.data.loader import SkippedImages, build_test_loader
from detkit.engine import distributed
from detkit.errors import ConfigError
from detkit.modeling.detector import Detector
from detkit.modeling.fold import M, fold_batchnorm, has_foldable
from detkit.modeling.layout import cpu_weights_in_nchw
from detkit.structures import ImageList

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


def amp_dtype(device: torch.device, amp: bool, kind: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of mixed precision (``train.amp``, ``train.amp_dtype``), or None
    for full precision. CUDA: bfloat16 where the GPU has it (Ampere and later: float32's
    range, so no loss scaling), else float16 (with a GradScaler, ``needs_grad_scaler``);
    ``kind`` bf16 / fp16 forces one. The CPU: bfloat16 only when asked for (kind bf16); auto
    keeps float32 there, since bfloat16 changes the results and is fast only on CPUs that
    compute it natively (AVX512-BF16 or AMX: a BCCD recipe training step took 0.57 of its
    float32 time on a Zen 4, 2026-12-01, README "BCCD"); elsewhere it is emulated, slower
    than float32, and a warning says so."""
    if not amp:
        return None
    if device.type == "cuda":
        if kind == "fp16":
            return torch.float16
        supported = torch.cuda.is_bf16_supported()
        if kind == "bf16" and not supported:
            raise ConfigError("train.amp_dtype: this GPU has no bfloat16; use auto or fp16")
        return torch.bfloat16 if supported else torch.float16
    if kind == "bf16":
        cpu_has_native_bf16()
        return torch.bfloat16
    if kind == "fp16":
        raise ConfigError("train.amp_dtype: fp16 autocast is for CUDA; on the CPU use bf16 or amp: false")
    return None


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX tiles), which oneDNN's
    bfloat16 kernels need to be faster than float32; warns once when it has neither."""
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if not native:
        logger.warning(
            "train.amp_dtype: bf16 on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there and usually "
            "slower than float32 (train.amp_dtype=auto keeps float32)"
        )
    return native


def needs_grad_scaler(dtype: Optional[torch.dtype]) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none."""
    return dtype == torch.float16


def autocast_context(device: torch.device, amp: Union[bool, torch.dtype, None]):
    """Autocast for ``amp``: a dtype (from ``amp_dtype``), True (the default dtype of the
    device: bfloat16 or float16 on CUDA, off on the CPU) or False / None (off)."""
    dtype = amp_dtype(device, True) if amp is True else (amp or None)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def images_to(images: ImageList, device: torch.device, channels_last: bool = False) -> ImageList:
    """The batch on ``device`` (asynchronously from pinned memory); ``channels_last``: in
    NHWC layout, which tensor-core convolutions prefer."""
    tensor = images.tensor.to(device, non_blocking=True)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return replace(images, tensor=tensor)


def inference_model(model: M) -> M:
    """The network inference runs for ``model``: for a Detector, an eval-mode copy with its
    fixed BatchNorm folded into the convolutions (``fold_batchnorm``: ``modeling.fold``) and
    its CPU weights in NCHW (``modeling.layout.cpu_weights_in_nchw``: a model trained
    channels-last evaluates as its checkpoint does); ``model`` itself is left as it is, so
    training and its checkpoints go on unchanged. ``model`` itself when there is nothing
    to change."""
    if not isinstance(model, Detector):
        return model
    was_training = model.training
    model.eval()  # BatchNorm folds only with its running statistics
    try:
        fold = model.fold_batchnorm and has_foldable(model)
        if not fold and not cpu_weights_in_nchw(model, dry_run=True):
            return model
        twin = copy.deepcopy(model)
    finally:
        model.train(was_training)
    if fold:
        fold_batchnorm(twin)
    cpu_weights_in_nchw(twin)
    return twin


@torch.no_grad()
def run_inference(
    model,
    dataset,
    batch_size: int = 1,
    device=None,
    num_workers: int = 0,
    compute_losses: bool = False,
    amp: Union[bool, torch.dtype, None] = False,
    progress: bool = True,
    desc: str = "eval",
    sharded: bool = False,
) -> Tuple[Dict, Dict[str, float], float]:
    """-> (detections per image id, mean validation loss per term ({} unless
    ``compute_losses``), seconds per image). Unreadable images are skipped (see the module
    doc). ``amp``: see ``autocast_context``.

    ``sharded`` (in a distributed run; every rank calls it): each rank runs its share of
    the test batches (``build_test_loader``'s shard: the batches of a one-process pass) and
    rank 0 gets every detection, in dataset order, and the losses of all batches; the other
    ranks get ({}, {}, seconds)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    net = inference_model(model)
    shard = (distributed.rank(), distributed.world_size()) if sharded else (0, 1)
    loader = build_test_loader(
        dataset,
        batch_size,
        num_workers,
        model.size_divisibility,
        skip_unreadable=True,
        shard=shard,
        pin_memory=device.type == "cuda",
    )
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
            images = images_to(images, device)
            with autocast_context(device, amp):
                detections, losses = net(images, targets if compute_losses else None)
            assert images.image_ids is not None  # the test loader names every image
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
    num_skipped = len(skipped)
    if shard[1] > 1:
        parts = distributed.gather_to_main((dets, dict(loss_sums), batches, num_skipped), f"gathering {desc} results")
        if parts is None:
            return {}, {}, (time.perf_counter() - start) / max(len(dataset), 1)
        dets, loss_sums, batches, num_skipped = _merge_parts(parts, dataset)
    if num_skipped:
        logger.warning(
            "%s: %d of %d images could not be read and were skipped; their ground truth counts as missed",
            desc,
            num_skipped,
            len(dataset),
        )
    seconds = (time.perf_counter() - start) / max(len(dataset), 1)
    return dets, {k: v / max(batches, 1) for k, v in loss_sums.items()}, seconds


def _merge_parts(parts, dataset):
    """The ranks' (dets, loss sums, batches, skipped) -> one, detections in dataset order
    (the order of a one-process pass)."""
    merged: Dict = {}
    loss_sums: Dict[str, float] = defaultdict(float)
    batches = num_skipped = 0
    for part_dets, part_losses, part_batches, part_skipped in parts:
        merged.update(part_dets)
        for k, v in part_losses.items():
            loss_sums[k] += v
        batches += part_batches
        num_skipped += part_skipped
    records = getattr(dataset, "records", None)
    if records is not None:
        merged = {r.image_id: merged[r.image_id] for r in records if r.image_id in merged}
    return merged, loss_sums, batches, num_skipped


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

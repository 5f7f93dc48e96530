"""What a run logs: ``metrics.jsonl`` (one JSON object per line) and, with
``train.tensorboard: true``, the same scalars as TensorBoard events in ``<run>/tensorboard/``
plus a few test images with their detections drawn at each evaluation.

Records (the keys other tools read):
    training:   iter, lr, loss, loss_<term>..., s_per_iter, data_s_per_iter, eta_s
    evaluation: iter, eval_metric, eval_mAP, eval_s_per_img, val_loss, val_loss_<term>...
    end of a training session: iter, train_minutes

TensorBoard tags are the record keys, grouped as ``train/<key>`` and ``eval/<key>`` (keys
starting with ``eval_`` or ``val_``); ``iter`` is the step; strings are not scalars.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from detkit.data.io import read_image_array
from detkit.engine.checkpoint import atomic_write_text
from detkit.errors import ConfigError, ImageReadError
from detkit.visualize import draw_detections

logger = logging.getLogger("detkit")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _summary_writer_class():
    """torch's SummaryWriter; a one-line ConfigError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard: true needs the tensorboard package: pip install tensorboard "
            "(or pip install 'detkit[tensorboard]'), or set train.tensorboard: false"
        ) from None
    return SummaryWriter


def record_iter(line: str) -> float:
    """The iteration a metrics.jsonl line belongs to. A line cut off by a crash counts as
    past every checkpoint (a resume drops it); a record without an iteration is kept."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf")
    it = record.get("iter") if isinstance(record, dict) else None
    return float(it) if isinstance(it, (int, float)) else float("-inf")


class MetricsLog:
    """Appends records to ``out_dir/metrics.jsonl``; mirrors numbers to TensorBoard when
    ``tensorboard`` is set (checked at construction: a missing package fails before training)."""

    def __init__(self, out_dir, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.tensorboard = bool(tensorboard)
        self._writer_class = _summary_writer_class() if self.tensorboard else None
        self._writer: Any = None
        self._purge_step: Optional[int] = None

    # -- metrics.jsonl -------------------------------------------------------------------------
    def log(self, record: Dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard and isinstance(record.get("iter"), int):
            writer = self._tb()
            for key, value in record.items():
                if key == "iter" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    group = "eval" if key.startswith(("eval_", "val_")) else "train"
                    writer.add_scalar(f"{group}/{key}", value, record["iter"])

    def trim(self, last_iter: int) -> None:
        """Drop records past ``last_iter``: a crashed run logged iterations after its last
        checkpoint, and the resumed run trains (and logs) them again. TensorBoard events from
        those steps are purged when the writer opens."""
        self._purge_step = last_iter + 1
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if record_iter(line) <= last_iter]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(line.rstrip("\n") + "\n" for line in kept))
            logger.info(
                "metrics.jsonl: dropped %d records after iteration %d (they are redone)",
                len(lines) - len(kept),
                last_iter,
            )

    # -- TensorBoard ---------------------------------------------------------------------------
    def _tb(self):
        if self._writer is None and self._writer_class is not None:
            self._writer = self._writer_class(str(self.out_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer

    def add_images(self, tag: str, images: Sequence[np.ndarray], step: int) -> None:
        """(H, W, 3) uint8 RGB images as ``tag/0``, ``tag/1``, ... (no-op without TensorBoard)."""
        if not self.tensorboard:
            return
        writer = self._tb()
        for i, image in enumerate(images):
            writer.add_image(f"{tag}/{i}", image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def detection_images(dataset, dets: Dict, class_names: List[str], count: int, score_thresh: float = 0.3):
    """The first ``count`` images of ``dataset`` that have detections in ``dets``, read from
    disk with their detections (score >= ``score_thresh``, original pixels) drawn."""
    out: List[np.ndarray] = []
    for record in dataset.records:
        if len(out) >= count:
            break
        det = dets.get(record.image_id)
        if det is None:
            continue
        try:
            image = read_image_array(record.file_name)
        except ImageReadError:
            continue
        keep = det["scores"] >= score_thresh
        out.append(draw_detections(image, det["boxes"][keep], det["scores"][keep], det["labels"][keep], class_names))
    return out

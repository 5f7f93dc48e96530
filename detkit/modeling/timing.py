"""Timing the Detector's three parts in eval mode (the papers' test-time split: proposals,
convolutional features, the per-region head; Fast R-CNN Table 4 reports "excluding proposal
time"). ``Detector.part_times`` holds a ``PartTimes`` while profiling
(``detkit.engine.profile``); ``PartClock`` adds each part's seconds to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class PartTimes:
    """Seconds an eval-mode Detector spent in each part, summed over the forward passes made
    while it was attached (``detector.part_times = PartTimes()``), and the images they saw.
    features: the backbone (all pyramid levels); proposals: the proposal generator (a
    precomputed file: only the look-up); head: the RoI head and the mapping to original
    pixels. CUDA is synchronised at each boundary, so the parts add up to the forward."""

    features: float = 0.0
    proposals: float = 0.0
    head: float = 0.0
    images: int = 0

    def per_image(self) -> Dict[str, float]:
        n = max(self.images, 1)
        return {
            "features": self.features / n,
            "proposals": self.proposals / n,
            "head": self.head / n,
            "total": (self.features + self.proposals + self.head) / n,
        }


class PartClock:
    """Adds the time since the last lap to a PartTimes field; does nothing without one."""

    def __init__(self, times: Optional[PartTimes], device: torch.device):
        self.times = times
        self.cuda = device.type == "cuda"
        self.last = self._now() if times is not None else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, part: str) -> None:
        if self.times is not None:
            now = self._now()
            setattr(self.times, part, getattr(self.times, part) + now - self.last)
            self.last = now

"""Toy pieces for the trainer and stage tests: a one-parameter "detector" whose loss can be
made to fail at a chosen call, a dataset of random 8x8 images, and a run-context builder."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detkit.data.dataset import DetectionDataset
from detkit.engine.stages import RunContext
from detkit.schema import Config, TrainConfig
from detkit.structures import Geometry, ImageRecord, Target


class ToyDetector(nn.Module):
    """loss = |w * mean(images)|; NaN from call ``nan_call`` on, RuntimeError at call
    ``crash_call`` (a process killed mid-run)."""

    size_divisibility = 1

    def __init__(self, nan_call: int = 10**9, crash_call: int = 10**9):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls = 0
        self.nan_call = nan_call
        self.crash_call = crash_call

    def forward(self, images, targets=None):
        self.calls += 1
        if self.calls >= self.crash_call:
            raise RuntimeError(f"killed at call {self.calls}")
        loss = (self.w * images.tensor.mean()).abs()
        if self.calls >= self.nan_call:
            loss = loss * float("nan")
        return [], {"loss_cls": loss}


class RandomImages(DetectionDataset):
    """n random 8x8 images (drawn from torch's RNG, like an augmentation) without boxes."""

    def __init__(self, n=4):
        super().__init__([ImageRecord(i, f"{i}.png", 8, 8) for i in range(n)], ["a"])

    def __getitem__(self, i):
        return torch.rand(3, 8, 8), Target(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_id=i, geometry=Geometry.identity(8, 8)
        )


def toy_config(**train) -> Config:
    cfg = Config()
    cfg.train = TrainConfig(**{"warmup_iters": 0, "device": "cpu", "log_period": 1, **train})
    cfg.data.batch_size = 2
    return cfg


def make_run(cfg, model, out, resume=False, train_set=None, test_set=None, evaluate_fn=None) -> RunContext:
    return RunContext(
        cfg,
        model,
        RandomImages() if train_set is None else train_set,
        test_set,
        out,
        ["a"],
        resume=resume,
        progress=False,
        evaluate_fn=evaluate_fn,
    )


@pytest.fixture
def toy():
    return SimpleNamespace(ToyDetector=ToyDetector, RandomImages=RandomImages, config=toy_config, make_run=make_run)

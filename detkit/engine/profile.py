"""Test-time speed of detectors, split into their three parts.

    times = profile_detectors({"before": (m1, test_set), "after": (m2, test_set)}, num_images=50)
    times["after"] -> {"features": s/img, "proposals": s/img, "head": s/img, "total": s/img}

The Detector times its parts itself while a ``PartTimes`` is attached
(``detkit.modeling.detector``): features = the backbone (every pyramid level), proposals =
the proposal generator (for a precomputed file only the look-up: Selective Search's own
time is in the file's meta, ``seconds_per_image``), head = the RoI head with the mapping back
to original pixels. Data loading is not timed. Images go one at a time (batch 1, the papers'
test setting), and the models take turns image by image, so that a machine busy with other
work slows each model alike and their ratio stays meaningful. The first image is run once
untimed per model (one-off kernel selection and allocation).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from detkit.data.loader import build_test_loader
from detkit.engine.inference import autocast_context, inference_model
from detkit.errors import UsageError
from detkit.modeling.timing import PartTimes

logger = logging.getLogger("detkit")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_megabytes(module: nn.Module) -> float:
    """Size of the module's state (parameters and buffers) as stored, in MB (10^6 bytes)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 1e6


@torch.no_grad()
def profile_detectors(
    entries: Mapping[str, Tuple[Any, Any]],
    num_images: int = 50,
    device: Optional[torch.device] = None,
    amp: bool = False,
) -> Dict[str, Dict[str, float]]:
    """entries: name -> (model, its test dataset); every dataset must list the same images
    (each model gets them through its own transforms). Seconds per image of each model's
    parts over the first ``num_images`` images (all when fewer), the models taking turns
    image by image (see the module doc).
    -> {name: {"features", "proposals", "head", "total", "images"}}."""
    if not entries:
        return {}
    sizes = {len(dataset) for _, dataset in entries.values()}
    n = min([int(num_images)] + list(sizes))
    if n < 1:
        raise UsageError(f"profiling needs at least one test image and num_images >= 1, got {n}")
    if device is None:
        device = next(next(iter(entries.values()))[0].parameters()).device
    loaders = {
        name: build_test_loader(dataset, 1, 0, int(model.size_divisibility), indices=list(range(n)))
        for name, (model, dataset) in entries.items()
    }
    times = {name: PartTimes() for name in entries}
    was_training = {name: model.training for name, (model, _) in entries.items()}
    try:
        for model, _ in entries.values():
            model.eval()
        # What run_inference runs (BatchNorm folded where the model asks for it).
        nets = {name: inference_model(model) for name, (model, _) in entries.items()}
        for i, batches in enumerate(zip(*loaders.values())):
            for name, (images, _) in zip(loaders, batches):
                model = nets[name]
                images = images.to(device)
                if i == 0:  # untimed warm-up
                    with autocast_context(device, amp):
                        model(images)
                model.part_times = times[name]
                try:
                    with autocast_context(device, amp):
                        model(images)
                finally:
                    model.part_times = None
    finally:
        for name, (model, _) in entries.items():
            model.train(was_training[name])
    return {name: {**t.per_image(), "images": t.images} for name, t in times.items()}

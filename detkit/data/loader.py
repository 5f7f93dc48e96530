"""Batching: padding collate, aspect-ratio grouped sampling, infinite training streams.

A batch is ``(ImageList, targets)``: images padded to a common size (a multiple of
``size_divisibility`` so every FPN level is whole) and the per-image target dicts.
Grouping landscape and portrait images into separate batches (as detectron2 and
torchvision's reference scripts do) keeps the padding, and so the wasted compute, small.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from detkit.structures import Geometry, ImageList


class Collate:
    """list[(image, Target)] -> (ImageList, list[Target])."""

    def __init__(self, size_divisibility: int = 32):
        self.size_divisibility = int(size_divisibility)

    def __call__(self, batch):
        images = [b[0] for b in batch]
        targets = [b[1] for b in batch]
        image_list = ImageList.from_tensors(
            images,
            self.size_divisibility,
            geometries=[t.geometry or Geometry.identity(*img.shape[-2:]) for img, t in zip(images, targets)],
            image_ids=[t.image_id for t in targets],
        )
        return image_list, targets


class GroupedBatchSampler(Sampler[List[int]]):
    """Infinite stream of batches; each batch holds images of one aspect-ratio group
    (h/w <= 1 or > 1). Indices come from a seeded permutation per epoch, so a run is
    reproducible and a resumed run can skip ahead to the same place.
    """

    def __init__(
        self, aspect_ratios: np.ndarray, batch_size: int, seed: int = 0, group: bool = True, start_batch: int = 0
    ):
        self.groups = (
            (np.asarray(aspect_ratios) > 1).astype(np.int64) if group else np.zeros(len(aspect_ratios), np.int64)
        )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_batch = int(start_batch)
        if len(self.groups) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if self.batch_size < 1:
            # A bucket would never fill: the stream would loop forever without a batch.
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")

    def __iter__(self) -> Iterator[List[int]]:
        buckets = {0: [], 1: []}
        epoch, produced = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            for i in torch.randperm(len(self.groups), generator=g).tolist():
                bucket = buckets[int(self.groups[i])]
                bucket.append(i)
                if len(bucket) == self.batch_size:
                    # A resumed run skips the batches it already trained on (indices only).
                    if produced >= self.start_batch:
                        yield list(bucket)
                    produced += 1
                    bucket.clear()
            epoch += 1


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch RNG (which the transforms use); numpy too, for safety.
    np.random.seed(torch.initial_seed() % 2**32)


def build_train_loader(
    dataset,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    size_divisibility: int = 32,
    start_batch: int = 0,
) -> DataLoader:
    """An endless loader: iterate it as long as the schedule needs; ``start_batch`` skips
    the first batches of the stream (resume)."""
    sampler = GroupedBatchSampler(dataset.aspect_ratios(), batch_size, seed, aspect_ratio_grouping, start_batch)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collate(size_divisibility),
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        generator=g,
        persistent_workers=num_workers > 0,
    )


def build_test_loader(
    dataset, batch_size: int = 1, num_workers: int = 0, size_divisibility: int = 32, indices: Optional[List[int]] = None
) -> DataLoader:
    """One pass in dataset order. Batches group consecutive images of the same orientation
    (keeping the order) so that padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(dataset))) if indices is None else list(indices)
    ratios = dataset.aspect_ratios()
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or (ratios[i] > 1) != (ratios[current[0]] > 1)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=Collate(size_divisibility),
        num_workers=num_workers,
    )

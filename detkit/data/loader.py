"""Batching: padding collate, aspect-ratio grouped sampling, infinite training streams,
per-sample augmentation seeds, and skipping images that cannot be read.

A batch is ``Batch(images, targets)``, unpacked like a pair: images padded to a common size
(a multiple of ``size_divisibility`` so every FPN level is whole) and the per-image
``Target``s; ``batch.skipped`` lists the (file, message) of images that could not be read
while making it. Grouping landscape and portrait images into separate batches (as detectron2
and torchvision's reference scripts do) keeps the padding, and so the wasted compute, small.

Reproducible streams. Every training sample is read under its own torch seed, a function
of (run seed, batch number, position in the batch) only, with the main process's random
state saved and restored around it. The random augmentations (flip, scale, colour) of batch b
are therefore the same with 0 or 2 workers and in a run resumed at batch b, and the loader
never moves the random stream the model draws from (RPN / RoI sampling). In distributed
training every rank reads its part of one global stream (``NumberedBatches``), so those
seeds are the same with any number of processes for the same global batch.

Unreadable images. An image that fails to read (``ImageReadError``: missing, truncated,
not an image) does not stop a run. In training another image of the same orientation group,
chosen from the sample's seed, takes its place (so the batch keeps its size and a resumed
run picks the same substitute); at test time the image is left out. Either way the failure
travels in the batch to the main process (a worker's log would not reach the user), where
``SkippedImages`` warns once per file and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detkit.errors import ImageReadError
from detkit.structures import Geometry, ImageList, Target

logger = logging.getLogger("detkit")

# (file, message) of one failed read.
Failure = Tuple[str, str]

# How many substitutes a training sample tries before it is dropped from its batch.
MAX_SUBSTITUTES = 10


@dataclass
class LoadedSample:
    """What the loader's dataset wrapper returns for one sample: the (image, target) pair,
    or None when no readable image was found, and the reads that failed on the way."""

    image: Optional[torch.Tensor]
    target: Optional[Target]
    failures: List[Failure] = field(default_factory=list)


class Batch(tuple):
    """(images, targets), unpacked like a pair; ``skipped``: the failed reads behind it.
    ``images`` is None when every image of the batch failed."""

    skipped: List[Failure]

    def __new__(cls, images: Optional[ImageList], targets: List[Target], skipped: Sequence[Failure] = ()):
        self = super().__new__(cls, (images, targets))
        self.skipped = list(skipped)
        return self

    def __reduce__(self):  # pickled from DataLoader workers: keep ``skipped``
        return (Batch, (self[0], self[1], self.skipped))

    def pin_memory(self) -> "Batch":
        """The images in page-locked memory (DataLoader's pin_memory thread calls this), so
        that the copy to the GPU can run asynchronously; targets are small and stay as they are."""
        images = self[0]
        if images is not None:
            images = replace(images, tensor=images.tensor.pin_memory())
        return Batch(images, self[1], self.skipped)


class Collate:
    """list[(image, Target) | LoadedSample] -> Batch(ImageList, list[Target], skipped)."""

    def __init__(self, size_divisibility: int = 32):
        self.size_divisibility = int(size_divisibility)

    def __call__(self, batch) -> Batch:
        pairs, skipped = [], []
        for item in batch:
            if isinstance(item, LoadedSample):
                skipped += item.failures
                if item.image is None:
                    continue
                item = (item.image, item.target)
            pairs.append(item)
        if not pairs:
            return Batch(None, [], skipped)
        images = [p[0] for p in pairs]
        targets = [p[1] for p in pairs]
        image_list = ImageList.from_tensors(
            images,
            self.size_divisibility,
            geometries=[t.geometry or Geometry.identity(*img.shape[-2:]) for img, t in zip(images, targets)],
            image_ids=[t.image_id for t in targets],
        )
        return Batch(image_list, targets, skipped)


def sample_seed(seed: int, batch: int, position: int) -> int:
    """The torch seed of the sample at ``position`` in batch number ``batch`` of a stream
    seeded with ``seed`` (SeedSequence mixes the three, so neighbouring seeds share nothing)."""
    entropy = [int(seed) % 2**63, int(batch), int(position)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


class SampleReader(Dataset):
    """Wraps a dataset for the loaders. Keys are plain indices (test: no seed, an unreadable
    image is left out) or (index, batch, position) triples from ``NumberedBatches``
    (training: seeded per sample; an unreadable image is replaced, see the module doc).

    ``groups``: (N,) orientation group of every image; substitutes come from the same group
    so that a batch stays of one orientation."""

    def __init__(self, dataset, seed: Optional[int] = None, groups: Optional[np.ndarray] = None):
        self.dataset = dataset
        self.seed = seed
        self.groups = groups
        # Indices known to fail in this process, with their message: not read again. Only
        # speed depends on it; which substitute is taken does not (see _substitutes).
        self._bad: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _file(self, index: int) -> str:
        records = getattr(self.dataset, "records", None)
        return str(records[index].file_name) if records is not None else str(index)

    def _read(self, index: int, seed: Optional[int]):
        """-> (image, target) or raises ImageReadError (remembered)."""
        if index in self._bad:
            raise ImageReadError(self._bad[index])
        try:
            if seed is None:
                return self.dataset[index]
            # Only this sample's draws come from ``seed``; the caller's random state is restored.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        except ImageReadError as exc:
            self._bad[index] = str(exc)
            raise

    def _substitutes(self, index: int, seed: int) -> List[int]:
        assert self.groups is not None
        same = np.flatnonzero(self.groups == self.groups[index])
        same = same[same != index]
        return np.random.default_rng(seed).permutation(same)[:MAX_SUBSTITUTES].tolist()

    def __getitem__(self, key) -> LoadedSample:
        if isinstance(key, tuple):
            index, batch, position = key
            seed: Optional[int] = sample_seed(self.seed or 0, batch, position)
        else:
            index, seed = int(key), None
        failures: List[Failure] = []
        candidates = [index]
        if seed is not None and self.groups is not None:
            candidates += self._substitutes(index, seed)
        for candidate in candidates:
            try:
                image, target = self._read(candidate, seed)
                return LoadedSample(image, target, failures)
            except ImageReadError as exc:
                failures.append((self._file(candidate), str(exc)))
        return LoadedSample(None, None, failures)


class SkippedImages:
    """Main-process bookkeeping of unreadable images: one warning the first time a file
    fails, then only a count; ``summary()`` for the end of a run."""

    def __init__(self, what: str, consequence: str):
        self.what = what
        self.consequence = consequence
        self.counts: Dict[str, int] = {}

    def add(self, failures: Sequence[Failure]) -> None:
        for file, message in failures:
            if file not in self.counts:
                logger.warning("%s: skipped an unreadable image: %s; %s", self.what, message, self.consequence)
                self.counts[file] = 0
            self.counts[file] += 1

    def __len__(self) -> int:
        return len(self.counts)

    def summary(self) -> Optional[str]:
        if not self.counts:
            return None
        names = ", ".join(Path(f).name for f in list(self.counts)[:3])
        more = f", +{len(self.counts) - 3} more" if len(self.counts) > 3 else ""
        times = sum(self.counts.values())
        noun = "image" if len(self.counts) == 1 else "images"
        return f"{self.what}: {len(self.counts)} unreadable {noun} skipped {times} times ({names}{more})"


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
        buckets: Dict[int, List[int]] = {0: [], 1: []}
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


class NumberedBatches(Sampler[List[Tuple[int, int, int]]]):
    """A batch sampler's batches as (index, batch number, position) keys for SampleReader;
    numbering starts at the sampler's ``start_batch`` (the training iteration).

    Distributed training (``world_size`` W > 1): the sampler's batches are global batches of
    W x B images; rank r keeps positions [r B, (r + 1) B) of each, keyed by their position
    in the global batch. So the ranks' streams are disjoint, and the images of an iteration
    and their augmentation seeds are those of one process training on the global batch."""

    def __init__(self, sampler: GroupedBatchSampler, rank: int = 0, world_size: int = 1):
        if sampler.batch_size % world_size:
            raise ValueError(f"global batch {sampler.batch_size} does not split into {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.sampler = sampler
        self.per_rank = sampler.batch_size // world_size
        self.first = rank * self.per_rank

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        own = slice(self.first, self.first + self.per_rank)
        for b, batch in enumerate(self.sampler, start=self.sampler.start_batch):
            positions = range(len(batch))[own]
            yield [(batch[position], b, position) for position in positions]


def build_train_loader(
    dataset,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    size_divisibility: int = 32,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of ``Batch``es of ``batch_size`` images: iterate it as long as the
    schedule needs; ``start_batch`` skips the first batches of the stream (resume).
    Unreadable images are replaced (see the module doc): check ``batch.skipped``.

    ``rank`` / ``world_size``: this process's share of a global stream of batch_size x
    world_size images per batch (``NumberedBatches``): the global stream, and so a resumed
    run, depends on the seed and the global batch only. ``pin_memory``: batches in
    page-locked memory (for asynchronous copies to a GPU)."""
    sampler = GroupedBatchSampler(
        dataset.aspect_ratios(), batch_size * world_size, seed, aspect_ratio_grouping, start_batch
    )
    return DataLoader(
        SampleReader(dataset, seed=seed, groups=sampler.groups),
        batch_sampler=NumberedBatches(sampler, rank, world_size),
        collate_fn=Collate(size_divisibility),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        # Starting an iterator draws the workers' base seed: from this generator, not from the
        # global RNG, which the model's sampling (and a resume's restored state) owns.
        generator=torch.Generator().manual_seed(seed),
    )


class _TestLoader(DataLoader):
    """A DataLoader that, unless it skips them, raises the first unreadable image's
    ImageReadError in the main process, with its one-line message (an exception raised in
    a worker would reach the user wrapped in a traceback dump)."""

    skip_unreadable: bool = False

    def __iter__(self):
        for batch in super().__iter__():
            if batch.skipped and not self.skip_unreadable:
                raise ImageReadError(batch.skipped[0][1])
            yield batch


def build_test_loader(
    dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    size_divisibility: int = 32,
    indices: Optional[List[int]] = None,
    skip_unreadable: bool = False,
    shard: Tuple[int, int] = (0, 1),
    pin_memory: bool = False,
) -> DataLoader:
    """One pass in dataset order. Batches group consecutive images of the same orientation
    (keeping the order) so that padding stays small. An unreadable image raises
    ImageReadError, or with ``skip_unreadable`` is left out of its batch (listed in
    ``batch.skipped``; a batch whose images all failed has ``images`` None).

    ``shard`` (rank, world size): only every world-size-th of those batches, from the rank's
    on. Whole batches are shared out, so every image is padded and computed exactly as in a
    one-process pass, and the ranks' detections together equal its detections."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(dataset))) if indices is None else list(indices)
    ratios = dataset.aspect_ratios()
    batches: List[List[int]] = []
    current: List[int] = []
    for i in order:
        if current and (len(current) == batch_size or (ratios[i] > 1) != (ratios[current[0]] > 1)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: rank outside 0..world size - 1")
    loader = _TestLoader(
        SampleReader(dataset),
        batch_sampler=batches[rank::world],
        collate_fn=Collate(size_divisibility),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # see build_train_loader
    )
    loader.skip_unreadable = skip_unreadable
    return loader

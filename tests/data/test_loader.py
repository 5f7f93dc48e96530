"""Tests of batching (detkit.data.loader): padding collate, aspect-ratio grouped sampling
with resumable streams, and the order-keeping test loader."""

from itertools import islice

import cv2
import numpy as np
import pytest
import torch

from detkit.data.dataset import DetectionDataset
from detkit.data.loader import (
    Batch,
    Collate,
    GroupedBatchSampler,
    LoadedSample,
    build_test_loader,
    build_train_loader,
    sample_seed,
)
from detkit.structures import Geometry, ImageRecord, Target

L, P = (30, 20), (20, 30)  # (width, height): landscape, portrait


def make_dataset(tmp_path, sizes):
    """One PNG per (width, height), every pixel = its index + 1 (so images can be told
    apart after batching), one box each."""
    records = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"im{i}.png"
        assert cv2.imwrite(str(path), np.full((h, w, 3), i + 1, np.uint8))
        records.append(ImageRecord(f"im{i}", str(path), w, h, boxes=[[1, 1, 5, 5]], labels=[1], difficult=[False]))
    return DetectionDataset(records, ["thing"])


def item(h, w, image_id, fill=1.0):
    geometry = Geometry((2 * h, 2 * w), (h, w))
    return torch.full((3, h, w), fill), Target(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, image_id, geometry
    )


def test_dataset_item_through_the_test_transforms(tmp_path):
    from detkit.data.transforms import build_transforms

    dataset = make_dataset(tmp_path, [L])
    dataset.transforms = build_transforms(False, min_size_test=40, max_size=1000, mean=(0, 0, 0), std=(1, 1, 1))
    image, target = dataset[0]
    assert image.shape == (3, 40, 60)  # 20x30 -> shorter side 40: factor 2
    assert target.geometry == Geometry((20, 30), (40, 60), False) and target.geometry.scale == (2.0, 2.0)
    assert target.boxes.tolist() == [[2, 2, 10, 10]]
    assert target.image_id == "im0" and target.labels.tolist() == [1]
    assert torch.allclose(image, torch.full_like(image, 1 / 255))
    # The record itself is untouched (the next epoch starts from original pixels again).
    assert dataset.records[0].boxes.tolist() == [[1, 1, 5, 5]]


# -- collate ----------------------------------------------------------------------------------
def test_collate_pads_with_zeros_to_a_multiple_of_size_divisibility():
    batch = [item(50, 70, "a", 1.0), item(40, 90, "b", 2.0)]
    images, targets = Collate(32)(batch)
    assert images.tensor.shape == (2, 3, 64, 96)  # max 50x90 rounded up to multiples of 32
    assert images.image_sizes == [(50, 70), (40, 90)]
    assert [g.orig_size for g in images.geometries] == [(100, 140), (80, 180)]
    assert images.image_ids == ["a", "b"]
    assert targets == [batch[0][1], batch[1][1]]
    assert bool((images.tensor[0, :, :50, :70] == 1.0).all())
    assert float(images.tensor[0, :, 50:, :].abs().sum()) == 0 and float(images.tensor[0, :, :, 70:].abs().sum()) == 0
    assert bool((images.tensor[1, :, :40, :90] == 2.0).all())
    assert float(images.tensor[1, :, 40:, :].abs().sum()) == 0 and float(images.tensor[1, :, :, 90:].abs().sum()) == 0
    # No divisibility: just the largest size.
    assert Collate(0)(batch)[0].tensor.shape == (2, 3, 50, 90)
    assert Collate(32)([item(64, 32, "c")])[0].tensor.shape == (1, 3, 64, 32)  # already multiples


# -- the training stream ---------------------------------------------------------------------
def test_without_grouping_the_stream_is_the_seeded_permutations_in_pairs():
    sampler = GroupedBatchSampler(np.ones(5), batch_size=2, seed=3, group=False)
    stream = torch.cat([torch.randperm(5, generator=torch.Generator().manual_seed(3 + e)) for e in range(3)]).tolist()
    # Epochs run on into each other: the 5th index of epoch 0 pairs with epoch 1's first.
    assert list(islice(sampler, 7)) == [stream[2 * i : 2 * i + 2] for i in range(7)]


def test_batches_hold_one_orientation_and_cover_every_image():
    ratios = np.array([0.75, 1.5, 0.75, 1.5, 1.0, 2.0, 0.5, 0.6, 1.2, 0.9])  # h / w; 1.0 is landscape
    portrait = set(np.flatnonzero(ratios > 1).tolist())
    batches = list(islice(GroupedBatchSampler(ratios, batch_size=2, seed=0), 40))
    assert all(len(b) == 2 for b in batches)
    for b in batches:
        assert len({i in portrait for i in b}) == 1, b
    seen = [i for b in batches for i in b]
    assert set(seen) == set(range(10))
    # 6 landscape and 4 portrait images fill 3 + 2 whole batches per epoch, with nothing left
    # over, so 40 batches are exactly 8 epochs: every image comes up exactly 8 times.
    assert np.bincount(seen, minlength=10).tolist() == [8] * 10


def test_stream_is_deterministic_per_seed():
    ratios = np.array([0.75, 1.5] * 6)
    first = list(islice(GroupedBatchSampler(ratios, 3, seed=5), 20))
    assert list(islice(GroupedBatchSampler(ratios, 3, seed=5), 20)) == first
    assert list(islice(GroupedBatchSampler(ratios, 3, seed=6), 20)) != first


@pytest.mark.parametrize("k", [0, 1, 7, 13])
def test_start_batch_skips_exactly_the_first_k_batches(k):
    ratios = np.array([0.75, 1.5, 0.75, 0.75, 1.5, 1.0, 2.0])
    full = list(islice(GroupedBatchSampler(ratios, 2, seed=1), 30))
    resumed = list(islice(GroupedBatchSampler(ratios, 2, seed=1, start_batch=k), 30 - k))
    assert resumed == full[k:]


def test_sampler_rejects_what_would_never_yield():
    with pytest.raises(ValueError, match="empty dataset"):
        GroupedBatchSampler(np.zeros(0), 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        GroupedBatchSampler(np.ones(3), 0)
    with pytest.raises(ValueError, match="start_batch must be >= 0"):
        GroupedBatchSampler(np.ones(3), 1, start_batch=-1)


def test_train_loader_batches_and_resumes(tmp_path):
    dataset = make_dataset(tmp_path, [L, P, L, P, L, P])
    loader = build_train_loader(dataset, batch_size=2, seed=0, size_divisibility=16)
    batches = list(islice(iter(loader), 6))
    for images, targets in batches:
        ids = images.image_ids
        assert [t.image_id for t in targets] == ids
        portrait = {int(i[2:]) % 2 == 1 for i in ids}
        assert len(portrait) == 1
        # 20x30 or 30x20 images: padded to multiples of 16 -> 32x32.
        assert images.tensor.shape == (2, 3, 32, 32)
        assert images.image_sizes == ([(30, 20)] * 2 if portrait == {True} else [(20, 30)] * 2)
        for n, image_id in enumerate(ids):  # each image is the right file
            assert float(images.tensor[n, 0, 0, 0]) == pytest.approx((int(image_id[2:]) + 1) / 255)
    resumed = list(islice(iter(build_train_loader(dataset, 2, seed=0, size_divisibility=16, start_batch=4)), 2))
    assert [b[0].image_ids for b in resumed] == [b[0].image_ids for b in batches[4:6]]


# -- the test loader -------------------------------------------------------------------------
def test_test_loader_keeps_dataset_order(tmp_path):
    dataset = make_dataset(tmp_path, [L, L, P, L, L, L, P, P])
    batches = [images.image_ids for images, _ in build_test_loader(dataset, batch_size=2, size_divisibility=0)]
    # Consecutive same-orientation images share a batch, in order, never more than two.
    assert batches == [["im0", "im1"], ["im2"], ["im3", "im4"], ["im5"], ["im6", "im7"]]
    single = [images.image_ids for images, _ in build_test_loader(dataset, batch_size=1)]
    assert single == [[f"im{i}"] for i in range(8)]
    subset = [images.image_ids for images, _ in build_test_loader(dataset, batch_size=4, indices=[7, 6, 0, 1])]
    assert subset == [["im7", "im6"], ["im0", "im1"]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_test_loader(dataset, batch_size=0)


def test_collate_tells_which_images_were_flipped():
    # Precomputed proposals are stored for the unflipped image: the batch must say which
    # images the pipeline mirrored so that their proposals are mirrored too.
    batch = [
        (torch.zeros(3, 4, 4), Target(torch.zeros(0, 4), torch.zeros(0), None, "a", Geometry((4, 4), (4, 4), True))),
        (torch.zeros(3, 4, 4), Target(torch.zeros(0, 4), torch.zeros(0), None, "b", Geometry((4, 4), (4, 4)))),
    ]
    images, _ = Collate(1)(batch)
    assert [g.flipped for g in images.geometries] == [True, False]
    assert [g.flipped for g in images.to("cpu").geometries] == [True, False]


# -- per-sample augmentation seeds -------------------------------------------------------------
class _Draws(DetectionDataset):
    """Each item is a random draw (as a flip or scale choice would be) tagged with its index."""

    def __init__(self, n=6):
        super().__init__([ImageRecord(i, f"{i}.png", 4, 4) for i in range(n)], ["a"])

    def __getitem__(self, i):
        draw = torch.rand(())
        return torch.full((3, 4, 4), float(draw)), Target(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), image_id=i, geometry=Geometry.identity(4, 4)
        )


def _stream(loader, n):
    return [(b[0].image_ids, b[0].tensor[:, 0, 0, 0].tolist()) for b in islice(iter(loader), n)]


def test_augmentation_draws_depend_only_on_the_place_in_the_stream():
    dataset = _Draws()
    plain = _stream(build_train_loader(dataset, 2, seed=4, size_divisibility=1), 6)
    workers = _stream(build_train_loader(dataset, 2, seed=4, num_workers=2, size_divisibility=1), 6)
    resumed = _stream(build_train_loader(dataset, 2, seed=4, size_divisibility=1, start_batch=3), 3)
    assert workers == plain  # with workers the same draws as without
    assert resumed == plain[3:]  # a resumed stream repeats the draws of the uninterrupted one
    # An image that comes up again (next epoch) gets a new draw: the seed is per position.
    draws = [d for _, ds in plain for d in ds]
    assert len(set(draws)) == len(draws)
    assert _stream(build_train_loader(dataset, 2, seed=5, size_divisibility=1), 6) != plain


def test_reading_samples_does_not_move_the_main_random_stream():
    # With num_workers 0 the samples are read in the main process, whose RNG the model's
    # sampling uses: it must come out of the loader untouched.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(islice(iter(build_train_loader(_Draws(), 2, seed=1, size_divisibility=1)), 4))
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_seeds_are_distinct_for_neighbouring_keys():
    seeds = {sample_seed(s, b, p) for s in range(3) for b in range(50) for p in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


# -- unreadable images -------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_training_image_is_replaced_by_one_of_the_same_orientation(tmp_path, workers):
    dataset = make_dataset(tmp_path, [L, P, L, P, L, P])
    broken = tmp_path / "im2.png"  # a landscape image
    broken.write_bytes(b"garbage")
    loader = build_train_loader(dataset, 2, seed=0, num_workers=workers, size_divisibility=16)
    batches = list(islice(iter(loader), 9))  # 3 epochs: im2 comes up 3 times
    skipped = [f for b in batches for f in b.skipped]
    assert skipped == [(str(broken), f"cannot decode image: {broken} (not an image or corrupt)")] * 3
    for images, targets in batches:
        assert len(targets) == 2 and "im2" not in images.image_ids  # batch size kept
        assert len({int(i[2:]) % 2 for i in images.image_ids}) == 1  # still one orientation
    # The substitute is a function of the sample's seed: the same with and without workers.
    reference = list(islice(iter(build_train_loader(dataset, 2, seed=0, size_divisibility=16)), 9))
    assert [b[0].image_ids for b in batches] == [b[0].image_ids for b in reference]


def test_a_batch_whose_images_all_fail_comes_back_empty(tmp_path):
    dataset = make_dataset(tmp_path, [L, L])
    for i in range(2):
        (tmp_path / f"im{i}.png").unlink()
    batch = next(iter(build_train_loader(dataset, 2, seed=0)))
    images, targets = batch
    assert images is None and targets == []
    assert sorted(f for f, _ in batch.skipped) == sorted([str(tmp_path / "im0.png"), str(tmp_path / "im1.png")] * 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_test_loader_raises_or_skips_unreadable_images(tmp_path, workers):
    from detkit.errors import ImageReadError

    dataset = make_dataset(tmp_path, [L, L, L])
    (tmp_path / "im1.png").write_bytes(b"garbage")
    # The one-line message names the file, also when a worker met it.
    with pytest.raises(ImageReadError) as err:
        list(build_test_loader(dataset, batch_size=2, num_workers=workers))
    assert str(err.value) == f"cannot decode image: {tmp_path / 'im1.png'} (not an image or corrupt)"
    batches = list(build_test_loader(dataset, batch_size=1, num_workers=workers, skip_unreadable=True))
    assert [b[0].image_ids if b[0] is not None else None for b in batches] == [["im0"], None, ["im2"]]
    assert [f for b in batches for f, _ in b.skipped] == [str(tmp_path / "im1.png")]


def test_batches_pickle_with_what_was_skipped():
    import pickle

    batch = Collate(1)([item(4, 4, "a"), LoadedSample(None, None, [("x.png", "cannot decode image: x.png")])])
    again = pickle.loads(pickle.dumps(batch))
    images, targets = again
    assert images.image_ids == ["a"] and again.skipped == [("x.png", "cannot decode image: x.png")]


# -- distributed training: the ranks' shares of one global stream -------------------------------------
def test_ranks_split_each_global_batch_and_keep_its_augmentation_draws():
    """With W ranks of batch B each, rank r reads positions [rB, (r+1)B) of the global batch
    a single process reads with batch W x B, with the same per-sample draws: the ranks'
    streams are disjoint, together they are the single process's stream, and they only
    depend on the seed and the global batch (so a resume on another world size with the
    same global batch continues the same stream)."""
    dataset = _Draws(n=12)
    single = _stream(build_train_loader(dataset, 4, seed=2, size_divisibility=1), 5)
    ranks = [
        _stream(build_train_loader(dataset, 2, seed=2, size_divisibility=1, rank=r, world_size=2), 5) for r in (0, 1)
    ]
    for b in range(5):
        ids = ranks[0][b][0] + ranks[1][b][0]
        assert ids == single[b][0] and len(set(ranks[0][b][0]) & set(ranks[1][b][0])) == 0
        assert ranks[0][b][1] + ranks[1][b][1] == single[b][1]  # the same flips / scales
    # a rank resumed at batch 3 continues its own share
    resumed = _stream(
        build_train_loader(dataset, 2, seed=2, size_divisibility=1, start_batch=3, rank=1, world_size=2), 2
    )
    assert resumed == ranks[1][3:5]
    # 4 ranks of 1 image: the same global stream again
    fours = [
        _stream(build_train_loader(dataset, 1, seed=2, size_divisibility=1, rank=r, world_size=4), 2) for r in range(4)
    ]
    assert [sum((fours[r][b][0] for r in range(4)), []) for b in range(2)] == [single[0][0], single[1][0]]


def test_test_loader_shards_whole_batches(tmp_path):
    dataset = make_dataset(tmp_path, [L, L, P, L, L, L, P, P])
    shards = [
        [images.image_ids for images, _ in build_test_loader(dataset, batch_size=2, size_divisibility=0, shard=(r, 2))]
        for r in (0, 1)
    ]
    # the one-process batches [im0 im1] [im2] [im3 im4] [im5] [im6 im7], dealt out in turn
    assert shards == [[["im0", "im1"], ["im3", "im4"], ["im6", "im7"]], [["im2"], ["im5"]]]
    with pytest.raises(ValueError, match="rank outside"):
        build_test_loader(dataset, shard=(2, 2))


def test_the_loaders_pin_memory_step_keeps_a_batch(monkeypatch):
    """DataLoader(pin_memory=True) hands every batch to torch's pin_memory(), which would
    turn a tuple subclass into a plain tuple and lose ``skipped``; Batch pins its images
    itself. (Pinning needs a GPU: a stand-in marks the tensors it was asked to pin.)"""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def fake_pin(tensor, *args, **kwargs):
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Collate(1)([item(4, 4, "a"), LoadedSample(None, None, [("x.png", "cannot decode image: x.png")])])
    out = pin_memory(batch)
    assert isinstance(out, Batch) and out.skipped == batch.skipped
    assert len(pinned) == 1 and pinned[0] is batch[0].tensor  # the image tensor, once
    assert torch.equal(out[0].tensor, batch[0].tensor) and out[0].image_ids == ["a"] and out[1] == batch[1]
    assert pin_memory(Collate(1)([LoadedSample(None, None, [])]))[0] is None  # nothing to pin

"""Tests of the box-aware transforms (detkit.data.transforms), including bit-exact parity
with torchvision's GeneralizedRCNNTransform, which the torchvision weight converter needs."""

import math

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkit.data.loader import Collate
from detkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Normalize,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    ResizeShortestEdge,
    build_transforms,
    resize_scale,
    unnormalize,
)
from detkit.structures import Geometry, Target


def target(boxes, geometry=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Target(boxes, torch.ones(len(boxes), dtype=torch.int64), image_id="x", geometry=geometry)


# -- resizing ---------------------------------------------------------------------------------
def test_resize_scale_short_side_unless_the_long_side_exceeds_max():
    assert resize_scale(480, 640, 600, 1000) == 600 / 480  # 800 <= 1000: short side rules
    assert resize_scale(100, 400, 600, 1000) == 1000 / 400  # 2400 > 1000: long side capped
    assert resize_scale(640, 480, 600, 1000) == 600 / 480  # portrait: same rule


@pytest.mark.parametrize(
    "h,w,short,max_size,expected",
    [
        (480, 640, 600, 1000, (600, 800)),
        (100, 400, 600, 1000, (250, 1000)),
        (640, 480, 600, 1000, (800, 600)),
        # 371 * (800 / 371) is 799.9999999999999 in floating point, and torchvision floors it:
        # the shorter side comes out one pixel short, and so must ours.
        (371, 500, 800, 1333, (799, 1078)),
    ],
)
def test_resize_output_size_is_the_floor_of_size_times_scale(h, w, short, max_size, expected):
    scale = resize_scale(h, w, short, max_size)
    assert (math.floor(h * scale), math.floor(w * scale)) == expected
    out, _ = ResizeShortestEdge([short], max_size)(torch.zeros(3, h, w), None)
    assert tuple(out.shape) == (3, *expected)
    tv = GeneralizedRCNNTransform(short, max_size, [0.0] * 3, [1.0] * 3).eval()
    assert tv([torch.zeros(3, h, w)])[0].image_sizes == [expected]


def test_resize_scales_boxes_per_axis_and_records_the_geometry():
    # 371x500 -> 799x1078: sy = 799/371, sx = 1078/500 (the factors of the pixels actually
    # produced, not the nominal 800/371).
    image = torch.zeros(3, 371, 500)
    earlier = Geometry((742, 250), (371, 500))  # an earlier resize from a 742x250 original
    out, t = ResizeShortestEdge([800], 1333)(image, target([[10, 20, 110, 220]], earlier))
    sy, sx = 799 / 371, 1078 / 500
    expected = torch.tensor([[10 * sx, 20 * sy, 110 * sx, 220 * sy]], dtype=torch.float32)
    torch.testing.assert_close(t.boxes, expected, rtol=1e-6, atol=0)  # float32 rounding only
    assert t.geometry == Geometry((742, 250), (799, 1078), False)  # composes with the earlier step
    assert t.geometry.scale == (799 / 742, 1078 / 250)
    assert t.labels.tolist() == [1]


def test_resize_keeps_an_empty_box_set_empty():
    out, t = ResizeShortestEdge([96], 1000)(torch.zeros(3, 48, 64), target([]))
    assert out.shape == (3, 96, 128)
    assert t.boxes.shape == (0, 4)
    assert t.geometry == Geometry((48, 64), (96, 128)) and t.geometry.scale == (2.0, 2.0)


def test_multi_scale_picks_only_from_the_list():
    resize = ResizeShortestEdge([32, 48, 64], 10_000)
    torch.manual_seed(0)
    seen = [resize(torch.zeros(3, 10, 20), None)[0].shape[1] for _ in range(60)]
    assert set(seen) == {32, 48, 64}
    torch.manual_seed(0)
    assert [resize(torch.zeros(3, 10, 20), None)[0].shape[1] for _ in range(60)] == seen  # seeded


def test_resize_needs_a_size():
    with pytest.raises(ValueError):
        ResizeShortestEdge([], 1000)
    assert ResizeShortestEdge(600, 1000).min_sizes == [600]


# -- flipping and normalising ----------------------------------------------------------------
def test_horizontal_flip_of_image_and_box():
    image = torch.arange(10, dtype=torch.float32).reshape(1, 2, 5).expand(3, 2, 5)
    out, t = RandomHorizontalFlip(1.0)(image, target([[1, 0, 3, 2], [0, 0, 5, 1]]))
    assert out[0, 0].tolist() == [4, 3, 2, 1, 0]
    # x1' = W - x2, x2' = W - x1 with W = 5: the continuous box [1, 3) maps to [2, 4).
    assert t.boxes.tolist() == [[2, 0, 4, 2], [0, 0, 5, 1]]
    assert t.geometry.flipped is True
    back, t2 = RandomHorizontalFlip(1.0)(out, t)
    assert torch.equal(back, image) and t2.boxes.tolist() == [[1, 0, 3, 2], [0, 0, 5, 1]]
    assert t2.geometry.flipped is False


def test_vertical_flip_of_image_and_box():
    image = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2).expand(3, 4, 2)
    out, t = RandomVerticalFlip(1.0)(image, target([[0, 1, 2, 2], [1, 0, 2, 4]]))
    assert out[0, :, 0].tolist() == [6, 4, 2, 0]
    # y1' = H - y2, y2' = H - y1 with H = 4: rows [1, 2) map to [2, 3); x untouched.
    assert t.boxes.tolist() == [[0, 2, 2, 3], [1, 0, 2, 4]]
    assert t.geometry.vflipped is True and t.geometry.flipped is False
    back, t2 = RandomVerticalFlip(1.0)(out, t)
    assert torch.equal(back, image) and t2.boxes.tolist() == [[0, 1, 2, 2], [1, 0, 2, 4]]
    assert t2.geometry.vflipped is False


def test_both_flips_map_boxes_back_to_the_original_through_the_geometry():
    # 40x60 original resized to 20x30, mirrored both ways: the record's invert lands on the
    # original box whatever the flips.
    image = torch.rand(3, 40, 60)
    t = target([[6, 4, 18, 30]])
    pipeline = [ResizeShortestEdge(20, 1000), RandomHorizontalFlip(1.0), RandomVerticalFlip(1.0)]
    for step in pipeline:
        image, t = step(image, t)
    # resized: [3, 2, 9, 15]; mirrored in width 30: [21, 2, 27, 15]; in height 20: [21, 5, 27, 18]
    assert t.boxes.tolist() == [[21, 5, 27, 18]]
    assert t.geometry == Geometry((40, 60), (20, 30), True, True)
    torch.testing.assert_close(t.geometry.invert(t.boxes), torch.tensor([[6.0, 4.0, 18.0, 30.0]]))
    assert torch.equal(t.geometry.apply(torch.tensor([[6.0, 4.0, 18.0, 30.0]])), t.boxes)


def test_flip_with_zero_probability_does_nothing():
    image = torch.rand(3, 4, 6)
    t = target([[1, 1, 2, 2]])
    out, t_out = RandomHorizontalFlip(0.0)(image, t)
    assert out is image and t_out is t
    out, t_out = RandomVerticalFlip(0.0)(image, t)
    assert out is image and t_out is t


def test_normalize():
    image = torch.ones(3, 2, 2)
    image[:, 1, 1] = 0.0
    out, _ = Normalize(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))(image, None)
    assert out[:, 0, 0].tolist() == [1.0, 3.0, 0.5]
    assert out[:, 1, 1].tolist() == [-1.0, -1.0, 0.0]
    assert torch.allclose(unnormalize(out, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)), image)


def test_color_jitter_changes_pixels_not_boxes():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    t = target([[1, 1, 4, 4]])
    out, t_out = ColorJitter(0.5, 0.5, 0.5, 0.1)(image.clone(), t)
    assert not torch.equal(out, image) and 0.0 <= out.min() and out.max() <= 1.0
    assert t_out.boxes.tolist() == [[1, 1, 4, 4]]


def test_build_transforms_pipelines():
    test = build_transforms(False, min_size_test=600, max_size=1000)
    assert [type(t) for t in test.transforms] == [Normalize, ResizeShortestEdge]
    assert test.transforms[1].min_sizes == [600]
    train = build_transforms(True, min_size_train=(480, 512), flip_prob=0.5, color_jitter=(0.1, 0, 0, 0))
    assert [type(t) for t in train.transforms] == [ColorJitter, Normalize, ResizeShortestEdge, RandomHorizontalFlip]
    assert train.transforms[2].min_sizes == [480, 512]
    both = build_transforms(True, flip_prob=0.5, vflip_prob=0.5)
    assert [type(t) for t in both.transforms][-2:] == [RandomHorizontalFlip, RandomVerticalFlip]
    assert build_transforms(False, vflip_prob=0.5).transforms[-1].__class__ is ResizeShortestEdge
    no_flip = build_transforms(True, flip_prob=0.0, color_jitter=(0, 0, 0, 0))
    assert [type(t) for t in no_flip.transforms] == [Normalize, ResizeShortestEdge]


# -- parity with torchvision -----------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(371, 500), (480, 640), (700, 333)])
def test_test_pipeline_is_bit_identical_to_torchvision(h, w):
    torch.manual_seed(h)
    image = torch.rand(3, h, w)
    boxes = [[3.5, 7.25, 100.0, 200.5], [0, 0, w, h]]
    tv = GeneralizedRCNNTransform(800, 1333, list(IMAGENET_MEAN), list(IMAGENET_STD)).eval()
    tv_images, tv_targets = tv([image.clone()], [{"boxes": torch.tensor(boxes)}])

    ours, t = build_transforms(False, min_size_test=800, max_size=1333)(image.clone(), target(boxes))
    nh, nw = tv_images.image_sizes[0]
    assert tuple(ours.shape) == (3, nh, nw)
    assert torch.equal(ours, tv_images.tensors[0, :, :nh, :nw])
    assert torch.equal(t.boxes, tv_targets[0]["boxes"])
    # Padded to a multiple of 32 with zeros, as torchvision batches them.
    batch, _ = Collate(32)([(ours, t)])
    assert batch.geometries == [Geometry((h, w), (nh, nw))]
    assert torch.equal(batch.tensor, tv_images.tensors)


def test_padded_batch_of_two_sizes_matches_torchvision():
    torch.manual_seed(1)
    images = [torch.rand(3, 371, 500), torch.rand(3, 300, 420)]
    tv = GeneralizedRCNNTransform(600, 1000, list(IMAGENET_MEAN), list(IMAGENET_STD)).eval()
    tv_images, _ = tv([im.clone() for im in images])
    pipeline = build_transforms(False, min_size_test=600, max_size=1000)
    items = [pipeline(im.clone(), target([])) for im in images]
    batch, _ = Collate(32)(items)
    assert batch.image_sizes == tv_images.image_sizes
    assert torch.equal(batch.tensor, tv_images.tensors)


@pytest.mark.parametrize("key", ["flip_prob", "vflip_prob"])
def test_flip_probabilities_outside_0_1_are_config_errors_naming_the_key(key):
    from detkit.config import from_dict
    from detkit.errors import ConfigError
    from detkit.schema import Config

    with pytest.raises(ConfigError, match=rf"^data.input: {key}: a probability in \[0, 1\], got 1.5"):
        from_dict(Config, {"data": {"input": {key: 1.5}}})

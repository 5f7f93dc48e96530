"""Tests of detkit.modeling.proposals.anchors: cell anchors written out by hand, grid
anchors and their (y, x, a) order, and equality with torchvision's AnchorGenerator (the
independent reference for the strides_from_input rule)."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from detkit.modeling.proposals.anchors import AnchorGenerator, cell_anchors

# size 32, ratio r = h / w: w = 32 / sqrt(r), h = 32 * sqrt(r), corners at +-w/2, +-h/2, rounded
#   r = 0.5: w = 45.255, h = 22.627 -> half 22.627, 11.314 -> [-23, -11, 23, 11]
#   r = 1:   w = h = 32              -> [-16, -16, 16, 16]
#   r = 2:   w = 22.627, h = 45.255  -> [-11, -23, 11, 23]
CELL_32 = torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]])


def test_cell_anchors_size_32_three_ratios():
    torch.testing.assert_close(cell_anchors([32], [0.5, 1.0, 2.0]), CELL_32)


def test_cell_anchors_are_ratio_major():
    # sizes (32, 64), ratios (0.5, 1): [r0 s0, r0 s1, r1 s0, r1 s1];
    # r = 0.5, s = 64: w = 90.51, h = 45.25 -> half 45.25, 22.63 -> [-45, -23, 45, 23]
    expected = torch.tensor(
        [[-23.0, -11.0, 23.0, 11.0], [-45.0, -23.0, 45.0, 23.0], [-16.0, -16.0, 16.0, 16.0], [-32.0, -32.0, 32.0, 32.0]]
    )
    torch.testing.assert_close(cell_anchors([32, 64], [0.5, 1.0]), expected)


def _expected_grid(cell, height, width, stride, offset):
    """Independent (y, x, a) enumeration with plain loops."""
    rows = []
    for y in range(height):
        for x in range(width):
            cx, cy = (x + offset) * stride, (y + offset) * stride
            for a in range(cell.shape[0]):
                rows.append([cx + cell[a, 0], cy + cell[a, 1], cx + cell[a, 2], cy + cell[a, 3]])
    return torch.tensor(rows)


def test_grid_anchors_2x3_stride_16_offset_0():
    gen = AnchorGenerator([[32]], [[0.5, 1.0, 2.0]], strides=[16])
    (anchors,) = gen([torch.zeros(1, 1, 2, 3)], (32, 48))
    assert anchors.shape == (2 * 3 * 3, 4)
    # (y, x, a) order: index (y * 3 + x) * 3 + a
    torch.testing.assert_close(anchors[0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))  # y0 x0 r0.5
    torch.testing.assert_close(anchors[4], torch.tensor([0.0, -16.0, 32.0, 16.0]))  # y0 x1 r1 (shift 16, 0)
    torch.testing.assert_close(anchors[(1 * 3 + 2) * 3 + 0], torch.tensor([9.0, 5.0, 55.0, 27.0]))  # y1 x2: (32, 16)
    torch.testing.assert_close(anchors[17], torch.tensor([21.0, -7.0, 43.0, 39.0]))  # y1 x2 r2
    torch.testing.assert_close(anchors, _expected_grid(CELL_32, 2, 3, 16, 0.0))


def test_grid_anchors_offset_half_centres_cells():
    gen = AnchorGenerator([[32]], [[0.5, 1.0, 2.0]], strides=[16], offset=0.5)
    (anchors,) = gen([torch.zeros(1, 1, 2, 3)], (32, 48))
    # location (y=0, x=0) is at (8, 8): the square anchor is [-8, -8, 24, 24]
    torch.testing.assert_close(anchors[1], torch.tensor([-8.0, -8.0, 24.0, 24.0]))
    # (y=1, x=2) at (40, 24)
    torch.testing.assert_close(anchors[16], torch.tensor([24.0, 8.0, 56.0, 40.0]))
    torch.testing.assert_close(anchors, _expected_grid(CELL_32, 2, 3, 16, 0.5))


def test_levels_repeat_single_entries_and_count_anchors():
    gen = AnchorGenerator([[32], [64]], [[0.5, 1.0, 2.0]], strides=[4, 8])
    assert gen.num_anchors_per_location() == [3, 3]
    gen = AnchorGenerator([[32, 64]], [[1.0]], strides=[16])
    assert gen.num_anchors_per_location() == [2]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="disagree"):
        AnchorGenerator([[32], [64]], [[1.0]], strides=[4, 8, 16])
    with pytest.raises(ValueError, match="offset"):
        AnchorGenerator([[32]], [[1.0]], strides=[16], offset=1.0)
    gen = AnchorGenerator([[32], [64]], [[1.0]], strides=[4, 8])
    with pytest.raises(ValueError, match="2 levels, got 1"):
        gen([torch.zeros(1, 1, 4, 4)], (16, 16))


def test_cache_returns_identical_anchors_per_size(monkeypatch):
    # The cache is used: a second request for the same size returns the same tensor object
    # and computes no new grid (one meshgrid per distinct size).
    calls = []
    meshgrid = torch.meshgrid
    monkeypatch.setattr(torch, "meshgrid", lambda *a, **k: calls.append(1) or meshgrid(*a, **k))
    gen = AnchorGenerator([[32]], [[1.0]], strides=[16])
    a = gen([torch.zeros(1, 1, 2, 3)], (32, 48))[0]
    b = gen([torch.zeros(1, 1, 2, 3)], (32, 48))[0]
    assert b is a and len(calls) == 1
    c = gen([torch.zeros(1, 1, 3, 3)], (48, 48))[0]
    assert c is not a and len(calls) == 2
    assert c.shape == (9, 4) and torch.equal(c[:6], a)
    assert gen([torch.zeros(1, 1, 2, 3)], (32, 48))[0] is a and len(calls) == 2


FPN_SIZES = [[32], [64], [128], [256], [512]]
FPN_RATIOS = [[0.5, 1.0, 2.0]]


def _torchvision_anchors(input_hw, feature_hws):
    tv = TVAnchorGenerator(tuple(tuple(s) for s in FPN_SIZES), ((0.5, 1.0, 2.0),) * 5)
    images = TVImageList(torch.zeros(1, 3, *input_hw), [input_hw])
    feats = [torch.zeros(1, 1, h, w) for h, w in feature_hws]
    return tv(images, feats)[0]


def test_fpn_anchors_equal_torchvision_with_odd_sizes():
    # input 352 x 480 -> P2..P5 at 88x120, 44x60, 22x30, 11x15; P6 = maxpool(P5, stride 2) 6x8.
    # torchvision's stride rule, input // feature: P6 gets 352 // 6 = 58 and 480 // 8 = 60.
    hws = [(88, 120), (44, 60), (22, 30), (11, 15), (6, 8)]
    feats = [torch.zeros(1, 1, h, w) for h, w in hws]
    theirs = _torchvision_anchors((352, 480), hws)
    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS, strides=[4, 8, 16, 32, 64], strides_from_input=True)
    ours = gen(feats, (352, 480))
    torch.testing.assert_close(torch.cat(ours), theirs)
    # the second P6 location is one stride to the right: x shifted by 60, not 64
    p6 = ours[4]
    torch.testing.assert_close(p6[3] - p6[0], torch.tensor([60.0, 0.0, 60.0, 0.0]))
    torch.testing.assert_close(p6[8 * 3] - p6[0], torch.tensor([0.0, 58.0, 0.0, 58.0]))  # next row: y + 58

    # With the backbone's true strides the first four levels agree, P6 does not.
    plain = AnchorGenerator(FPN_SIZES, FPN_RATIOS, strides=[4, 8, 16, 32, 64])(feats, (352, 480))
    n4 = sum(h * w * 3 for h, w in hws[:4])
    torch.testing.assert_close(torch.cat(plain[:4]), theirs[:n4])
    assert not torch.equal(plain[4], theirs[n4:])
    torch.testing.assert_close(plain[4][3] - plain[4][0], torch.tensor([64.0, 0.0, 64.0, 0.0]))


def test_fpn_anchors_equal_torchvision_when_sizes_divide():
    # 256 x 320: every level divides exactly (P6 4x5: 256 // 4 = 320 // 5 = 64): both rules agree.
    hws = [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]
    feats = [torch.zeros(1, 1, h, w) for h, w in hws]
    theirs = _torchvision_anchors((256, 320), hws)
    for from_input in (True, False):
        gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS, strides=[4, 8, 16, 32, 64], strides_from_input=from_input)
        torch.testing.assert_close(torch.cat(gen(feats, (256, 320))), theirs)

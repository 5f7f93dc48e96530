"""Tests of detkit.modeling.box_ops: BoxCoder, Matcher, BalancedSampler and the small box
helpers. Expectations are computed by hand in the comments; torchvision's BoxCoder (same
convention) is the independent reference on random inputs."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import box_iou

from detkit.modeling.box_ops import (
    DEFAULT_SCALE_CLAMP,
    BalancedSampler,
    BoxCoder,
    Matcher,
    clip_boxes,
    nonempty,
    pairwise_iou,
    smooth_l1,
)

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------
# BoxCoder
# ----------------------------------------------------------------------------------------

# reference (0, 0, 10, 20): w 10, h 20, centre (5, 10)
# target    (2, 4, 12, 44): w 10, h 40, centre (7, 24)
# -> dx = (7 - 5) / 10 = 0.2, dy = (24 - 10) / 20 = 0.7, dw = log(10/10) = 0, dh = log(40/20)
REF = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
TGT = torch.tensor([[2.0, 4.0, 12.0, 44.0]])


def test_encode_hand_made_pair():
    deltas = BoxCoder().encode(TGT, REF)
    torch.testing.assert_close(deltas, torch.tensor([[0.2, 0.7, 0.0, LOG2]]))


def test_weights_scale_the_deltas():
    # (10, 10, 5, 5): [10 * 0.2, 10 * 0.7, 5 * 0, 5 * log 2] = [2, 7, 0, 3.4657359]
    deltas = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(TGT, REF)
    torch.testing.assert_close(deltas, torch.tensor([[2.0, 7.0, 0.0, 5 * LOG2]]))
    # and decoding with the same weights undoes them
    torch.testing.assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, REF), TGT)


def test_decode_hand_made_pair():
    boxes = BoxCoder().decode(torch.tensor([[0.2, 0.7, 0.0, LOG2]]), REF)
    torch.testing.assert_close(boxes, TGT)


def test_decode_inverts_encode_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    refs = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 80], 1)
    xy = torch.rand(50, 2, generator=g) * 100
    tgts = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 80], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(tgts, refs), refs), tgts, rtol=1e-5, atol=1e-4)


def test_scale_clamp_keeps_huge_deltas_finite():
    # dw = dh = 100 would be exp(100) ~ 2.7e43 (inf in float32 after * w); the clamp makes it
    # exp(log(1000 / 16)) * 16 = 1000 px wide around the centre (8, 8): [-492, -492, 508, 508].
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), ref)
    assert torch.isfinite(boxes).all()
    assert DEFAULT_SCALE_CLAMP == pytest.approx(math.log(1000.0 / 16))
    width = math.exp(math.log(1000.0 / 16)) * 16
    torch.testing.assert_close(boxes, torch.tensor([[8 - width / 2, 8 - width / 2, 8 + width / 2, 8 + width / 2]]))
    torch.testing.assert_close(boxes, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    # The clamp is on the unweighted delta: with ww = 5 a raw 500 is 100 after division.
    boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.tensor([[0.0, 0.0, 500.0, 500.0]]), ref)
    torch.testing.assert_close(boxes, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    # Negative deltas are not clamped (shrinking cannot overflow): exp(-log 2) * 16 = 8 px.
    boxes = BoxCoder().decode(torch.tensor([[0.0, 0.0, -LOG2, -LOG2]]), ref)
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 4.0, 12.0, 12.0]]))


def test_decode_class_specific_deltas():
    # R = 2 references, K = 2 classes: deltas (2, 8) -> boxes (2, 8), class k in columns 4k..4k+3.
    refs = torch.tensor([[0.0, 0.0, 10.0, 20.0], [10.0, 10.0, 30.0, 20.0]])
    deltas = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.2, 0.7, 0.0, LOG2],
            # ref 2: w 20, h 10, centre (20, 15); class 1: shift x by 0.5 * 20 = 10;
            # class 2: halve the height (dh = -log 2) -> h 5 around y 15.
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -LOG2],
        ]
    )
    boxes = BoxCoder().decode(deltas, refs)
    expected = torch.tensor(
        [
            [0.0, 0.0, 10.0, 20.0, 2.0, 4.0, 12.0, 44.0],
            [20.0, 10.0, 40.0, 20.0, 10.0, 12.5, 30.0, 17.5],
        ]
    )
    assert boxes.shape == (2, 8)
    torch.testing.assert_close(boxes, expected)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_agrees_with_torchvision_box_coder(weights):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 200
    refs = torch.cat([xy, xy + 2 + torch.rand(40, 2, generator=g) * 150], 1)
    xy = torch.rand(40, 2, generator=g) * 200
    gts = torch.cat([xy, xy + 2 + torch.rand(40, 2, generator=g) * 150], 1)
    ours, theirs = BoxCoder(weights), TVBoxCoder(weights)
    # torchvision's encode_single(reference_boxes=GT, proposals) is our encode(targets, references)
    torch.testing.assert_close(ours.encode(gts, refs), theirs.encode_single(gts, refs))
    deltas = torch.randn(40, 12, generator=g) * 3  # 3 boxes per reference, some dw > clamp
    deltas[0, 2] = 80.0
    torch.testing.assert_close(ours.decode(deltas, refs), theirs.decode_single(deltas, refs))


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def test_clip_boxes_per_axis_and_batched_shape():
    # size = (h, w) = (20, 30): x into [0, 30], y into [0, 20]
    boxes = torch.tensor([[-5.0, -1.0, 40.0, 25.0], [3.0, 4.0, 5.0, 6.0]])
    torch.testing.assert_close(
        clip_boxes(boxes, (20, 30)), torch.tensor([[0.0, 0.0, 30.0, 20.0], [3.0, 4.0, 5.0, 6.0]])
    )
    batched = boxes.view(1, 2, 4).repeat(3, 1, 1)  # (..., 4) shapes are kept
    assert clip_boxes(batched, (20, 30)).shape == (3, 2, 4)
    torch.testing.assert_close(clip_boxes(batched, (20, 30))[2], clip_boxes(boxes, (20, 30)))


def test_nonempty_uses_both_sides():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 5.0], [0.0, 0.0, 5.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    assert nonempty(boxes, 1.0).tolist() == [True, False, False, False]
    assert nonempty(boxes, 0.0).tolist() == [True, True, True, True]


def test_smooth_l1_sum_and_l1_limit():
    x, t = torch.tensor([0.05, -0.5, 2.0]), torch.zeros(3)
    # beta 0.1: 0.5 * 0.05^2 / 0.1 = 0.0125; |-0.5| - 0.05 = 0.45; 2 - 0.05 = 1.95 -> 2.4125
    assert smooth_l1(x, t, 0.1).item() == pytest.approx(2.4125)
    # beta 0 is plain L1: 0.05 + 0.5 + 2 = 2.55
    assert smooth_l1(x, t, 0.0).item() == pytest.approx(2.55)
    assert smooth_l1(torch.zeros(0, 4), torch.zeros(0, 4), 1.0).item() == 0.0


def test_pairwise_iou_empty_shapes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert pairwise_iou(torch.zeros(0, 4), boxes).shape == (0, 1)
    assert pairwise_iou(boxes, torch.zeros(0, 4)).shape == (1, 0)
    # [0,0,10,10] vs [5,0,15,10]: 50 / 150
    assert pairwise_iou(boxes, torch.tensor([[5.0, 0.0, 15.0, 10.0]])).item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------
# Matcher
# ----------------------------------------------------------------------------------------

# G = 2 ground truths x R = 7 predictions. Best IoU per prediction (column max):
#   p0 0.9 (g0) | p1 0.69 (g0) | p2 0.7 (g0) | p3 0.4 (g1, g0 has 0.3) | p4 0.4 (g1)
#   p5 0.3 (g0) | p6 0.29 (g0)
# g1's best IoU is 0.4, reached by p3 and p4 (a tie).
IOU = torch.tensor(
    [
        [0.9, 0.69, 0.7, 0.3, 0.29, 0.3, 0.29],
        [0.0, 0.1, 0.2, 0.4, 0.4, 0.05, 0.0],
    ]
)


def test_rpn_thresholds_without_low_quality():
    matched, labels = Matcher([0.3, 0.7], [0, -1, 1])(IOU)
    # [0, 0.3) -> 0, [0.3, 0.7) -> -1, [0.7, 1] -> 1: 0.7 is positive, 0.3 ignored, 0.29 negative
    assert labels.tolist() == [1, -1, 1, -1, -1, -1, 0]
    assert matched.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert matched.dtype == torch.int64 and labels.dtype == torch.int8


def test_rpn_low_quality_matches_include_ties():
    matched, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(IOU)
    # g0's best (0.9, p0) is positive anyway; g1's best 0.4 is shared by p3 and p4: both positive.
    assert labels.tolist() == [1, -1, 1, 1, 1, -1, 0]
    assert matched.tolist() == [0, 0, 0, 1, 1, 0, 0]


def test_low_quality_rule_skips_gt_without_any_overlap():
    # g1 overlaps nothing (best IoU 0): no prediction becomes positive because of it.
    iou = torch.tensor([[0.8, 0.1, 0.0], [0.0, 0.0, 0.0]])
    _, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 0, 0]


def test_fast_rcnn_thresholds():
    iou = torch.tensor([[0.05, 0.1, 0.49, 0.5, 0.0, 1.0]])
    _, labels = Matcher([0.1, 0.5], [-1, 0, 1])(iou)
    # [0, 0.1) ignore, [0.1, 0.5) background, [0.5, 1] foreground
    assert labels.tolist() == [-1, 0, 0, 1, -1, 1]


def test_boundaries_from_real_boxes_in_float32():
    # IoUs computed by box_iou in float32 land exactly on the thresholds:
    # [0,0,10,10] vs [0,0,7,10] = 70/100 = 0.7, vs [0,0,3,10] = 0.3, vs [0,0,10,20] = 0.5
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    preds = torch.tensor([[0.0, 0.0, 7.0, 10.0], [0.0, 0.0, 3.0, 10.0], [0.0, 0.0, 10.0, 20.0]])
    iou = box_iou(gt, preds)
    _, labels = Matcher([0.3, 0.7], [0, -1, 1])(iou)
    assert labels.tolist() == [1, -1, -1]
    _, labels = Matcher([0.1, 0.5], [-1, 0, 1])(iou)
    assert labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "thresholds, labels, expected",
    [([0.3, 0.7], [0, -1, 1], 0), ([0.1, 0.5], [-1, 0, 1], -1), ([0.0, 0.5], [0, 0, 1], 0)],
)
def test_empty_ground_truth_gets_label_of_iou_zero(thresholds, labels, expected):
    matched, lab = Matcher(thresholds, labels, allow_low_quality_matches=True)(torch.zeros(0, 5))
    assert matched.tolist() == [0] * 5
    assert lab.tolist() == [expected] * 5
    assert matched.dtype == torch.int64 and lab.dtype == torch.int8


@pytest.mark.parametrize(
    "thresholds, labels",
    [([0.3, 0.7], [0, 1]), ([0.7, 0.3], [0, -1, 1]), ([0.5], [0, 2]), ([0.3, 0.7], [0, -1, 1, 1])],
)
def test_bad_matcher_arguments_raise(thresholds, labels):
    with pytest.raises(ValueError, match="Matcher"):
        Matcher(thresholds, labels)


# ----------------------------------------------------------------------------------------
# BalancedSampler
# ----------------------------------------------------------------------------------------


def _labels(num_pos, num_neg, num_ignore):
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignore)]).long()
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]


def test_sampler_counts_respect_fraction():
    labels = _labels(10, 100, 5)
    pos, neg = BalancedSampler(16, 0.25)(labels)
    # at most int(16 * 0.25) = 4 positives, 16 - 4 = 12 negatives, never an ignored one
    assert pos.numel() == 4 and neg.numel() == 12
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 4 and len(set(neg.tolist())) == 12


def test_sampler_fills_with_negatives():
    labels = _labels(2, 100, 5)
    pos, neg = BalancedSampler(16, 0.5)(labels)
    assert pos.numel() == 2 and neg.numel() == 14  # only 2 positives: 16 - 2 negatives
    assert (labels[neg] == 0).all()


def test_sampler_takes_all_when_too_few():
    labels = _labels(2, 3, 50)
    pos, neg = BalancedSampler(256, 0.5)(labels)
    assert sorted(pos.tolist()) == sorted(torch.nonzero(labels == 1).squeeze(1).tolist())
    assert sorted(neg.tolist()) == sorted(torch.nonzero(labels == 0).squeeze(1).tolist())


def test_sampler_no_positives_and_all_ignored():
    pos, neg = BalancedSampler(8, 0.5)(_labels(0, 20, 0))
    assert pos.numel() == 0 and neg.numel() == 8
    pos, neg = BalancedSampler(8, 0.5)(_labels(0, 0, 20))
    assert pos.numel() == 0 and neg.numel() == 0


def test_sampler_is_deterministic_under_seed():
    labels = _labels(30, 200, 10)
    sampler = BalancedSampler(32, 0.25)
    torch.manual_seed(7)
    a = sampler(labels)
    torch.manual_seed(7)
    b = sampler(labels)
    torch.manual_seed(8)
    c = sampler(labels)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert a[1].tolist() != c[1].tolist()  # 24 of 200 negatives: another seed picks others

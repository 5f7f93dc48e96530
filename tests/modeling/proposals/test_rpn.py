"""Tests of detkit.modeling.proposals.rpn: anchor labelling (hand-made IoUs, cross-boundary
anchors), the losses (hand-computed pins and an independent re-computation on a seeded
head), empty ground truth, and proposal selection (top-k per level, clip, min size, NMS,
post top-k, sigmoid scores, train/test settings)."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.proposals.anchors import AnchorGenerator
from detkit.modeling.proposals.rpn import RPN, RPNHead
from detkit.structures import ImageList, Proposals, Target


def boxes_target(boxes):
    """A Target with these GT boxes (all class 1): the RPN looks only at the boxes."""
    return Target(boxes, torch.ones(len(boxes), dtype=torch.int64))


BETA = 1.0 / 9


def make_rpn(sizes=((16,),), ratios=((1.0,),), stride=16, offset=0.5, channels=4, batch=256, **kw):
    anchors = AnchorGenerator([list(s) for s in sizes], [list(r) for r in ratios], strides=[stride], offset=offset)
    head = RPNHead(channels, anchors.num_anchors_per_location()[0])
    return RPN(
        head,
        anchors,
        BoxCoder(),
        Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        BalancedSampler(batch, 0.5),
        in_features=["p"],
        smooth_l1_beta=BETA,
        **kw,
    )


def constant_head(rpn, logit):
    """Every anchor gets objectness logit ``logit`` and zero deltas."""
    with torch.no_grad():
        for conv in (rpn.head.cls_logits, rpn.head.bbox_pred):
            conv.weight.zero_()
            conv.bias.zero_()
        rpn.head.cls_logits.bias.fill_(logit)


def images_of(*sizes):
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    return ImageList(torch.zeros(len(sizes), 3, h, w), list(sizes))


# 2 x 2 map, stride 16, size 16, ratio 1, offset 0.5 -> anchors
#   a0 [0, 0, 16, 16]  a1 [16, 0, 32, 16]  a2 [0, 16, 16, 32]  a3 [16, 16, 32, 32]
# GT g0 = a0 (IoU 1); g1 = [16, 16, 28, 28]: IoU with a3 = 144 / 256 = 0.5625 (in the ignore band,
# but a3 is g1's best anchor -> positive by the low-quality rule). Labels [1, 0, 0, 1].
GT = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 28.0, 28.0]])


def test_label_anchors_hand_made():
    rpn = make_rpn()
    (anchors,) = rpn.anchor_generator([torch.zeros(1, 4, 2, 2)], (32, 32))
    torch.testing.assert_close(
        anchors, torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]])
    )
    labels, matched = rpn.label_anchors(anchors, [boxes_target(GT)], [(32, 32)])
    assert labels.tolist() == [[1, 0, 0, 1]]
    torch.testing.assert_close(matched[0, 0], GT[0])
    torch.testing.assert_close(matched[0, 3], GT[1])


def test_allowed_border_ignores_cross_boundary_anchors():
    # offset 0: a0 [-8, -8, 8, 8], a1 [8, -8, 24, 8], a2 [-8, 8, 8, 24], a3 [8, 8, 24, 24];
    # GT = a3 (IoU 1), the others IoU 0 (negatives unless they cross the border).
    gt = [boxes_target(torch.tensor([[8.0, 8.0, 24.0, 24.0]]))]
    anchors = make_rpn(offset=0.0).anchor_generator([torch.zeros(1, 4, 2, 2)], (32, 32))[0]
    labels, _ = make_rpn(offset=0.0, allowed_border=0).label_anchors(anchors, gt, [(32, 32)])
    assert labels.tolist() == [[-1, -1, -1, 1]]
    labels, _ = make_rpn(offset=0.0, allowed_border=-1).label_anchors(anchors, gt, [(32, 32)])
    assert labels.tolist() == [[0, 0, 0, 1]]
    labels, _ = make_rpn(offset=0.0, allowed_border=8).label_anchors(anchors, gt, [(32, 32)])
    assert labels.tolist() == [[0, 0, 0, 1]]  # 8 px outside is still allowed
    # the border is the image's own valid size: in a 16 x 16 image a3 reaches 8 px beyond it
    labels, _ = make_rpn(offset=0.0, allowed_border=0).label_anchors(anchors, gt, [(16, 16)])
    assert labels.tolist() == [[-1, -1, -1, -1]]


def test_border_gt_gets_its_best_inside_anchor():
    # offset 0: a0 [-8, -8, 8, 8] crosses the border, a3 [8, 8, 24, 24] lies inside.
    # GT [0, 0, 12, 12]: IoU with a0 = 64 / (256 + 144 - 64) = 0.19, with a3 = 16 / 384 = 0.042;
    # a0 is its best anchor overall but is ignored, so the low-quality positive must be a3
    # (chosen among inside anchors, as py-faster-rcnn drops outside anchors before matching).
    gt = [boxes_target(torch.tensor([[0.0, 0.0, 12.0, 12.0]]))]
    rpn = make_rpn(offset=0.0, allowed_border=0)
    anchors = rpn.anchor_generator([torch.zeros(1, 4, 2, 2)], (32, 32))[0]
    labels, matched = rpn.label_anchors(anchors, gt, [(32, 32)])
    assert labels.tolist() == [[-1, -1, -1, 1]]
    torch.testing.assert_close(matched[0, 3], gt[0].boxes[0])


def test_losses_hand_computed_zero_logits():
    rpn = make_rpn()
    constant_head(rpn, 0.0)
    _, losses = rpn(images_of((32, 32)), {"p": torch.randn(1, 4, 2, 2)}, [boxes_target(GT)])
    # 4 anchors sampled (2 pos, 2 neg), logit 0: BCE = log 2 each -> (4 log 2) / 4
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-6)
    # a0 -> g0: target 0. a3 [16,16,32,32] (centre 24, side 16) -> g1 (centre 22, side 12):
    # dx = dy = -2/16 = -0.125, dw = dh = log(12/16) = -0.2876821; deltas are 0.
    # smooth-L1 (beta 1/9, |x| >= beta): |x| - beta/2 -> 2 * (0.125 - 1/18) + 2 * (0.2876821 - 1/18)
    expected_box = (2 * (0.125 - 1 / 18) + 2 * (-math.log(0.75) - 1 / 18)) / 4
    assert expected_box == pytest.approx(0.1507855, abs=1e-6)
    assert losses["loss_rpn_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_losses_hand_computed_logit_one():
    rpn = make_rpn()
    constant_head(rpn, 1.0)
    _, losses = rpn(images_of((32, 32)), {"p": torch.randn(1, 4, 2, 2)}, [boxes_target(GT)])
    # positives (a0, a3): log(1 + e^-1) = 0.3132617; negatives (a1, a2): log(1 + e) = 1.3132617
    assert losses["loss_rpn_cls"].item() == pytest.approx((2 * 0.3132617 + 2 * 1.3132617) / 4, rel=1e-6)


def test_empty_ground_truth_image():
    rpn = make_rpn()
    constant_head(rpn, 0.5)
    proposals, losses = rpn(images_of((32, 32)), {"p": torch.randn(1, 4, 2, 2)}, [boxes_target(torch.zeros(0, 4))])
    # all 4 anchors negative: BCE(0.5, 0) = log(1 + e^0.5) each
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-6)
    assert losses["loss_rpn_box"].item() == 0.0
    assert len(proposals) == 1 and len(proposals[0]) > 0


def _independent_losses(feature, rpn, targets):
    """Re-computes the RPN losses without the RPN's own labelling/flattening code.
    Valid when the sampler takes every non-ignored anchor (batch >= anchors per image)."""
    logits_map, deltas_map = rpn.head([feature])
    logits_map, deltas_map = logits_map[0], deltas_map[0]
    n, a_count, h, w = logits_map.shape
    stride = rpn.anchor_generator.strides[0]
    off = rpn.anchor_generator.offset
    cell = []
    for r in rpn.anchor_generator.aspect_ratios[0]:
        for s in rpn.anchor_generator.sizes[0]:
            cell.append((round(s / math.sqrt(r) / 2), round(s * math.sqrt(r) / 2)))
    bce_sum, box_sum, count = 0.0, 0.0, 0
    for i in range(n):
        anchors, logits, deltas = [], [], []
        for y in range(h):
            for x in range(w):
                cx, cy = (x + off) * stride, (y + off) * stride
                for a, (hw_, hh_) in enumerate(cell):
                    anchors.append([cx - hw_, cy - hh_, cx + hw_, cy + hh_])
                    logits.append(logits_map[i, a, y, x])
                    deltas.append(deltas_map[i, 4 * a : 4 * a + 4, y, x])
        anchors = torch.tensor(anchors, dtype=torch.float32)
        gt = targets[i].boxes
        if len(gt):
            iou = box_iou(gt, anchors)
            best, matched = iou.max(0)
            labels = torch.where(best >= 0.7, 1, torch.where(best >= 0.3, -1, 0))
            for g in range(len(gt)):
                ties = (iou[g] == iou[g].max()) & (iou[g] > 0)
                labels[ties] = 1
        else:
            labels, matched = torch.zeros(len(anchors), dtype=torch.long), torch.zeros(len(anchors), dtype=torch.long)
        for j in range(len(anchors)):
            if labels[j] < 0:
                continue
            count += 1
            z, t = logits[j].double().item(), float(labels[j] == 1)
            bce_sum += max(z, 0) - z * t + math.log1p(math.exp(-abs(z)))
            if labels[j] == 1:
                ref, g = anchors[j].tolist(), gt[matched[j]].tolist()
                rw, rh, gw, gh = ref[2] - ref[0], ref[3] - ref[1], g[2] - g[0], g[3] - g[1]
                target = [
                    (g[0] + gw / 2 - ref[0] - rw / 2) / rw,
                    (g[1] + gh / 2 - ref[1] - rh / 2) / rh,
                    math.log(gw / rw),
                    math.log(gh / rh),
                ]
                for d, tt in zip(deltas[j].tolist(), target):
                    e = abs(d - tt)
                    box_sum += 0.5 * e * e / BETA if e < BETA else e - 0.5 * BETA
    return bce_sum / count, box_sum / count


def test_losses_match_independent_computation_on_seeded_head():
    torch.manual_seed(0)
    # one level 4 x 4, stride 8, size 16, ratios (0.5, 1, 2): 48 anchors per image
    rpn = make_rpn(sizes=((16,),), ratios=((0.5, 1.0, 2.0),), stride=8, channels=4)
    with torch.no_grad():  # larger weights than the std-0.01 init so the losses are not trivial
        for p in rpn.head.parameters():
            p.normal_(std=0.5)
    feature = torch.randn(2, 4, 4, 4)
    targets = [
        boxes_target(torch.tensor([[2.0, 3.0, 18.0, 20.0], [16.0, 14.0, 30.0, 31.0]])),
        boxes_target(torch.zeros(0, 4)),  # an empty-GT image in the same batch
    ]
    images = images_of((32, 32), (28, 30))
    _, losses = rpn(images, {"p": feature}, targets)
    with torch.no_grad():
        exp_cls, exp_box = _independent_losses(feature, rpn, targets)
    assert exp_box > 0.01 and exp_cls > 0.1  # a case where both terms matter
    assert losses["loss_rpn_cls"].item() == pytest.approx(exp_cls, rel=1e-5)
    assert losses["loss_rpn_box"].item() == pytest.approx(exp_box, rel=1e-5)
    # gradients reach the head through both terms
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    assert rpn.head.cls_logits.weight.grad.abs().sum() > 0
    assert rpn.head.bbox_pred.weight.grad.abs().sum() > 0


def test_sampled_count_normalises_both_terms():
    # batch 2 per image, fraction 0.5: 1 positive + 1 negative of the hand-made case.
    rpn = make_rpn(batch=2)
    constant_head(rpn, 0.0)
    torch.manual_seed(0)
    _, losses = rpn(images_of((32, 32)), {"p": torch.randn(1, 4, 2, 2)}, [boxes_target(GT)])
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-6)  # (2 log 2) / 2
    # the positive is a0 (box loss 0) or a3 (the hand value above, times 4 / 2)
    a3 = (2 * (0.125 - 1 / 18) + 2 * (-math.log(0.75) - 1 / 18)) / 2
    value = losses["loss_rpn_box"].item()
    assert value == pytest.approx(0.0, abs=1e-7) or value == pytest.approx(a3, rel=1e-5)


# ----------------------------------------------------------------------------------------
# proposal selection
# ----------------------------------------------------------------------------------------

# One level, 5 anchors, zero deltas, image (h, w) = (50, 100):
#   a0 [0, 0, 10, 10]        logit 3
#   a1 [1, 0, 11, 10]        logit 2   IoU with a0 = 90 / 110 = 0.82 -> removed by NMS 0.7
#   a2 [3, 0, 13, 10]        logit 1   IoU with a0 = 70 / 130 = 0.54 -> kept
#   a3 [20, 20, 20.0005, 30] logit 4   width 5e-4 < min_size 1e-3 -> dropped
#   a4 [90, -10, 130, 10]    logit 0   clipped to [90, 0, 100, 10]
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [3, 0, 13, 10], [20, 20, 20.0005, 30], [90, -10, 130, 10]])
LOGITS = torch.tensor([[3.0, 2.0, 1.0, 4.0, 0.0]])


def _select(rpn, anchors=ANCHORS, logits=LOGITS, sizes=((50, 100),), deltas=None):
    deltas = torch.zeros(logits.shape[0], anchors.shape[0], 4) if deltas is None else deltas
    return rpn.select_proposals([anchors], [logits], [deltas], list(sizes))


def test_selection_clip_min_size_nms_and_sigmoid_scores():
    rpn = make_rpn(pre_nms_topk=(10, 10), post_nms_topk=(10, 10)).eval()
    (p,) = _select(rpn)
    torch.testing.assert_close(p.boxes, torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [90, 0, 100, 10]]))
    # sigmoid(3) = 0.9525741, sigmoid(1) = 0.7310586, sigmoid(0) = 0.5, sorted high to low
    torch.testing.assert_close(p.scores, torch.tensor([0.9525741, 0.7310586, 0.5]))


def test_selection_post_nms_topk():
    rpn = make_rpn(pre_nms_topk=(10, 10), post_nms_topk=(10, 2)).eval()
    (p,) = _select(rpn)
    torch.testing.assert_close(p.boxes, torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10]]))


def test_selection_pre_nms_topk_comes_first():
    # top-3 logits are a3 (4), a0 (3), a1 (2): a3 is too small, a1 is suppressed -> only a0;
    # a2 and a4 never compete although they would survive NMS.
    rpn = make_rpn(pre_nms_topk=(10, 3), post_nms_topk=(10, 10)).eval()
    (p,) = _select(rpn)
    torch.testing.assert_close(p.boxes, torch.tensor([[0.0, 0, 10, 10]]))


def test_train_and_eval_use_their_own_topk():
    rpn = make_rpn(pre_nms_topk=(10, 3), post_nms_topk=(1, 10))
    rpn.train()
    (p,) = _select(rpn)  # train: pre 10 (all), post 1 -> the best surviving box a0
    assert len(p) == 1
    rpn.eval()
    (p,) = _select(rpn)  # eval: pre 3 -> a0 only, as above
    assert len(p) == 1
    rpn = make_rpn(pre_nms_topk=(10, 3), post_nms_topk=(10, 10)).train()
    assert len(_select(rpn)[0]) == 3  # train pre 10: a0, a2, a4


def test_selection_is_per_level_and_per_image():
    rpn = make_rpn(pre_nms_topk=(1, 1), post_nms_topk=(10, 10)).eval()
    # level 0: [0,0,10,10] (logit 1) beats [50,0,60,10] (logit 0) for the single pre-NMS slot;
    # level 1: [0,0,10,10.5] overlaps level 0's box at IoU 0.95 but NMS runs per level.
    anchors = [torch.tensor([[0.0, 0, 10, 10], [50, 0, 60, 10]]), torch.tensor([[0.0, 0, 10, 10.5]])]
    logits = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0], [2.0]])]
    deltas = [torch.zeros(2, 2, 4), torch.zeros(2, 1, 4)]
    # image 1 is 8 px high: its boxes are clipped to y <= 8
    p0, p1 = rpn.select_proposals(anchors, logits, deltas, [(50, 100), (8, 100)])
    torch.testing.assert_close(p0.boxes, torch.tensor([[0.0, 0, 10, 10.5], [0, 0, 10, 10]]))
    torch.testing.assert_close(p0.scores, torch.sigmoid(torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(p1.boxes, torch.tensor([[0.0, 0, 10, 8], [50, 0, 60, 8]]))


def test_selection_decodes_deltas():
    rpn = make_rpn(pre_nms_topk=(10, 10), post_nms_topk=(10, 10)).eval()
    # a0 [0,0,10,10] with dx = 0.5, dw = log 2: centre 5 + 5 = 10, width 20 -> [0, 0, 20, 10]
    deltas = torch.zeros(1, 1, 4)
    deltas[0, 0] = torch.tensor([0.5, 0.0, math.log(2), 0.0])
    (p,) = _select(rpn, ANCHORS[:1], LOGITS[:, :1], deltas=deltas)
    torch.testing.assert_close(p.boxes, torch.tensor([[0.0, 0.0, 20.0, 10.0]]))


def test_forward_proposals_are_detached_sorted_and_inside_the_image():
    torch.manual_seed(0)
    rpn = make_rpn(
        sizes=((16, 32),), ratios=((0.5, 1.0, 2.0),), stride=8, pre_nms_topk=(50, 20), post_nms_topk=(30, 10)
    )
    with torch.no_grad():
        for p in rpn.head.parameters():
            p.normal_(std=0.3)
    images = images_of((40, 48), (32, 24))
    feature = torch.randn(2, 4, 5, 6, requires_grad=True)
    rpn.eval()
    proposals, losses = rpn(images, {"p": feature})
    assert losses == {}
    for p, (h, w) in zip(proposals, images.image_sizes):
        assert isinstance(p, Proposals)
        assert 0 < len(p) <= 10
        assert not p.boxes.requires_grad and not p.scores.requires_grad
        assert (p.scores[:-1] >= p.scores[1:]).all()
        assert ((p.scores > 0) & (p.scores < 1)).all()
        assert (p.boxes[:, 0::2] >= 0).all() and (p.boxes[:, 0::2] <= w).all()
        assert (p.boxes[:, 1::2] >= 0).all() and (p.boxes[:, 1::2] <= h).all()
    rpn.train()
    proposals, _ = rpn(images, {"p": feature})
    assert all(len(p) <= 30 for p in proposals) and any(len(p) > 10 for p in proposals)


def test_head_output_shapes():
    head = RPNHead(8, 3, conv_depth=2)
    logits, deltas = head([torch.zeros(2, 8, 5, 7), torch.zeros(2, 8, 3, 4)])
    assert [t.shape for t in logits] == [(2, 3, 5, 7), (2, 3, 3, 4)]
    assert [t.shape for t in deltas] == [(2, 12, 5, 7), (2, 12, 3, 4)]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.conv) == 2
    # paper init: zero bias, small Gaussian weights
    assert head.cls_logits.bias.abs().sum() == 0 and head.cls_logits.weight.std() < 0.05


# ----------------------------------------------------------------------------------------
# labelling across FPN levels against torchvision's RPN
# ----------------------------------------------------------------------------------------

FPN_SIZES = [[32], [64], [128], [256], [512]]
FPN_HWS = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # P2..P6 of a 128 x 160 input


def _fpn_rpn():
    anchors = AnchorGenerator(FPN_SIZES, [[0.5, 1.0, 2.0]], strides=[4, 8, 16, 32, 64])
    rpn = RPN(
        RPNHead(4, 3),
        anchors,
        BoxCoder(),
        Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        BalancedSampler(256, 0.5),
        in_features=["p2", "p3", "p4", "p5", "p6"],
    )
    levels = anchors([torch.zeros(1, 4, h, w) for h, w in FPN_HWS], (128, 160))
    return rpn, levels


def _torchvision_rpn():
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead

    return RegionProposalNetwork(
        TVAnchorGenerator(((32,),) * 5, ((0.5, 1.0, 2.0),) * 5),
        TVRPNHead(4, 3),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )


def _two_gts_sharing_their_best_anchor(anchors, anchor_index, rng):
    """Two GT boxes jittered around anchor ``anchor_index`` whose unique best anchor (over all
    levels) is that one, both below IoU 0.7: only the low-quality rule makes it positive, and
    it is the best anchor of two GT boxes at once."""
    a = anchors[anchor_index]
    found = []
    for _ in range(20000):
        jitter = torch.from_numpy(rng.uniform(-6, 6, 4)).float()
        box = a + jitter
        if box[2] - box[0] < 8 or box[3] - box[1] < 8:
            continue
        iou = box_iou(box[None], anchors)[0]
        best = iou.max()
        if best < 0.7 and iou[anchor_index] == best and int((iou == best).sum()) == 1:
            found.append(box)
            if len(found) == 2:
                return torch.stack(found)
    raise AssertionError("no GT pair found")


def test_fpn_labels_equal_torchvision_assign_targets_to_anchors():
    import numpy as np

    rpn, levels = _fpn_rpn()
    anchors = torch.cat(levels)
    level_of = torch.cat([torch.full((len(a),), i) for i, a in enumerate(levels)])
    rng = np.random.default_rng(0)
    # P2, size 32, ratio 1 at location (y, x) = (10, 10): [24, 24, 56, 56]
    shared = (10 * 40 + 10) * 3 + 1  # (y * W + x) * A + ratio index
    assert anchors[shared].tolist() == [24.0, 24.0, 56.0, 56.0]
    pair = _two_gts_sharing_their_best_anchor(anchors, shared, rng)
    # plus GT boxes of every size P2..P6 serves (log-uniform 16..400 px), on two images
    sides = 16 * (25 ** torch.from_numpy(rng.random((12, 2))).float())
    xy = torch.from_numpy(rng.random((12, 2))).float() * torch.tensor([160.0, 128.0]) - sides / 3
    random_gt = torch.cat([xy, xy + sides], 1)
    # and one larger than the image, whose best anchors are P6's 512 px ones
    huge = torch.tensor([[-120.0, -140.0, 280.0, 260.0]])
    gts = [torch.cat([pair, random_gt[:6]]), torch.cat([random_gt[6:], huge])]

    labels, matched = rpn.label_anchors(anchors, [boxes_target(g) for g in gts], [(128, 160), (120, 150)])
    tv_labels, tv_matched = _torchvision_rpn().assign_targets_to_anchors(
        [anchors, anchors], [{"boxes": g} for g in gts]
    )
    for i in range(2):
        assert torch.equal(labels[i], tv_labels[i].to(torch.int64)), i
        pos = labels[i] == 1
        torch.testing.assert_close(matched[i][pos], tv_matched[i][pos], rtol=0, atol=0)
    # not vacuous: positives on every level, some only through the low-quality rule, negatives
    # and ignored anchors too
    assert set(level_of[(labels == 1).any(0)].tolist()) == {0, 1, 2, 3, 4}
    assert (labels == 0).any() and (labels == -1).any()
    # the shared anchor: positive although below 0.7, matched to the GT it overlaps most
    ious = box_iou(pair, anchors[shared][None])[:, 0]
    assert labels[0, shared] == 1 and ious.max() < 0.7
    torch.testing.assert_close(matched[0, shared], pair[int(ious.argmax())])

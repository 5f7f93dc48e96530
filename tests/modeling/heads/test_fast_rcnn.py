"""Tests of detkit.modeling.heads.fast_rcnn: RoI labelling and sampling on a hand-made case,
hand-computed and seeded loss pins, class-agnostic regression, empty ground truth, and
inference (softmax, per-class decode and NMS, thresholds, cap, clipping)."""

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.heads.fast_rcnn import FastRCNNHead, FastRCNNPredictor, MLPBoxHead
from detkit.modeling.poolers import RoIPooler
from detkit.structures import Detections, ImageList, Proposals, Target

C = 4  # feature channels


def make_head(num_classes=2, batch=8, fraction=0.75, bg_lo=0.1, agnostic=False, **kw):
    box_head = MLPBoxHead(C * 2 * 2, (16,))
    return FastRCNNHead(
        RoIPooler(2, [1 / 8], sampling_ratio=2),
        box_head,
        FastRCNNPredictor(16, num_classes, agnostic),
        num_classes,
        BoxCoder((10.0, 10.0, 5.0, 5.0)),
        Matcher([bg_lo, 0.5], [-1, 0, 1] if bg_lo > 0 else [0, 0, 1]),
        BalancedSampler(batch, fraction),
        in_features=["p"],
        **kw,
    )


# GT g0 [0,0,10,10] class 2, g1 [20,20,40,40] class 1. Proposals and their best IoU:
#   p0 [0,0,10,10]    g0 1.0                -> fg, class 2, target 0
#   p1 [0,0,10,20]    g0 100/200 = 0.5      -> fg (>= 0.5), class 2
#   p2 [0,0,10,25]    g0 100/250 = 0.4      -> bg
#   p3 [0,0,10,110]   g0 100/1100 = 0.091   -> ignored (< 0.1)
#   p4 [25,20,45,40]  g1 300/500 = 0.6      -> fg, class 1
#   p5 [100,100,120,120] 0                  -> ignored
# plus g0 and g1 themselves (IoU 1, fg). Encoded targets, weights (10, 10, 5, 5):
#   p1 (w 10, h 20, centre (5, 10)) -> g0 (centre (5, 5), h 10): dy = 10 * -5/20 = -2.5,
#      dh = 5 * log(10/20) = -3.4657359
#   p4 (centre (35, 30), w 20) -> g1 (centre (30, 30)): dx = 10 * -5/20 = -2.5
PROPOSALS = torch.tensor(
    [[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 25], [0, 0, 10, 110], [25, 20, 45, 40], [100, 100, 120, 120]]
)
TARGET = Target(torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), torch.tensor([2, 1]))
D = 5 * math.log(0.5)
EXPECTED_ROWS = {  # box -> (label, encoded target)
    (0.0, 0.0, 10.0, 10.0): [(2, (0.0, 0.0, 0.0, 0.0))] * 2,  # p0 and g0
    (0.0, 0.0, 10.0, 20.0): [(2, (0.0, -2.5, 0.0, D))],
    (25.0, 20.0, 45.0, 40.0): [(1, (-2.5, 0.0, 0.0, 0.0))],
    (20.0, 20.0, 40.0, 40.0): [(1, (0.0, 0.0, 0.0, 0.0))],
    (0.0, 0.0, 10.0, 25.0): [(0, (0.0, 0.0, 0.0, 0.0))],
}


def _rows(boxes, labels, targets):
    rows = {}
    for b, lab, t in zip(boxes.tolist(), labels.tolist(), targets.tolist()):
        rows.setdefault(tuple(b), []).append((lab, tuple(round(v, 5) for v in t)))
    return rows


def _rounded(expected):
    return {k: [(lab, tuple(round(v, 5) for v in t)) for lab, t in v] for k, v in expected.items()}


def test_label_and_sample_hand_made():
    head = make_head()
    (boxes,), labels, targets = head.label_and_sample([PROPOSALS], [TARGET])
    # batch 8, 75 %: up to 6 fg -> all 5 fg, then min(1 bg, 8 - 5) = 1 bg; p3 and p5 never sampled
    assert boxes.shape == (6, 4) and labels.shape == (6,) and targets.shape == (6, 4)
    assert labels[:5].gt(0).all() and labels[5] == 0  # positives first, then negatives
    assert _rows(boxes, labels, targets) == _rounded(EXPECTED_ROWS)


def test_label_and_sample_without_gt_as_proposals():
    head = make_head(add_gt_as_proposals=False)
    (boxes,), labels, targets = head.label_and_sample([PROPOSALS], [TARGET])
    expected = dict(EXPECTED_ROWS)
    expected[(0.0, 0.0, 10.0, 10.0)] = expected[(0.0, 0.0, 10.0, 10.0)][:1]
    del expected[(20.0, 20.0, 40.0, 40.0)]
    assert _rows(boxes, labels, targets) == _rounded(expected)


def test_label_and_sample_bg_from_zero_and_quota():
    # bg_lo = 0: p3 and p5 become background too (labels [0, 0, 1]); 5 fg + 3 bg.
    head = make_head(bg_lo=0.0)
    _, labels, _ = head.label_and_sample([PROPOSALS], [TARGET])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 2, 2, 2]
    # fraction 0.25 of 8: at most 2 fg, 6 slots for the 3 bg
    head = make_head(bg_lo=0.0, fraction=0.25)
    _, labels, _ = head.label_and_sample([PROPOSALS], [TARGET])
    assert (labels > 0).sum() == 2 and (labels == 0).sum() == 3


def test_label_and_sample_empty_ground_truth():
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    # bg in [0, 0.5): every proposal is background (IoU 0)
    (boxes,), labels, targets = make_head(bg_lo=0.0).label_and_sample([PROPOSALS], [empty])
    assert labels.tolist() == [0] * 6 and targets.abs().sum() == 0
    assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, PROPOSALS.tolist()))
    # bg in [0.1, 0.5) (the Fast R-CNN paper): IoU 0 is ignored, nothing is sampled
    (boxes,), labels, targets = make_head(bg_lo=0.1).label_and_sample([PROPOSALS], [empty])
    assert boxes.shape == (0, 4) and labels.numel() == 0 and targets.shape == (0, 4)


def test_losses_hand_computed():
    head = make_head()
    logits = torch.zeros(2, 3)  # uniform over background + 2 classes: CE = log 3 per row
    labels = torch.tensor([2, 0])
    # row 0 is class 2: only its deltas (columns 4..7) count; row 1 is background: none.
    deltas = torch.tensor([[9.0, 9, 9, 9, 0.5, -2.0, 0, 0], [7.0, 7, 7, 7, 7, 7, 7, 7]])
    targets = torch.zeros(2, 4)
    losses = head.losses(logits, deltas, labels, targets)
    assert losses["loss_cls"].item() == pytest.approx(math.log(3), rel=1e-6)
    # smooth-L1 beta 1: 0.5 * 0.5^2 = 0.125; |-2| - 0.5 = 1.5 -> 1.625 / 2 sampled RoIs
    assert losses["loss_box"].item() == pytest.approx(0.8125, rel=1e-6)
    # class-agnostic regression: (R, 4) deltas, the same numbers
    agnostic = make_head(agnostic=True).losses(logits, deltas[:, 4:], labels, targets)
    assert agnostic["loss_box"].item() == pytest.approx(0.8125, rel=1e-6)


# A batch with no sampled RoI (possible with the paper's background floor of 0.1 on images
# without objects) must give zero losses, also with class-specific regression.
@pytest.mark.parametrize("agnostic", [False, True])
def test_losses_without_samples_are_zero_and_differentiable(agnostic):
    head = make_head(agnostic=agnostic)
    logits = torch.zeros(0, 3, requires_grad=True)
    deltas = torch.zeros(0, 4 if agnostic else 8, requires_grad=True)
    losses = head.losses(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box"].item() == 0.0
    (losses["loss_cls"] + losses["loss_box"]).backward()


@pytest.mark.parametrize("agnostic", [False, True])
def test_losses_match_independent_computation_on_seeded_predictor(agnostic):
    torch.manual_seed(0)
    head = make_head(batch=16, fraction=0.5, bg_lo=0.0, agnostic=agnostic)
    with torch.no_grad():  # larger than the paper's init so the box term is not ~0
        head.predictor.bbox_pred.weight.normal_(std=0.5)
        head.predictor.cls_score.weight.normal_(std=0.5)
    features = {"p": torch.randn(2, C, 8, 8)}
    props = [PROPOSALS, torch.tensor([[5.0, 5, 30, 30], [40, 40, 60, 60], [0, 0, 64, 64]])]
    targets = [TARGET, Target(torch.tensor([[6.0, 4, 30, 28]]), torch.tensor([1]))]
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 64)])

    torch.manual_seed(1)
    sampled, labels, box_targets = head.label_and_sample(props, targets)
    torch.manual_seed(1)  # the head samples the same RoIs again
    _, losses = head.train()(images, features, [Proposals(p, torch.ones(len(p))) for p in props], targets)

    with torch.no_grad():
        logits, deltas = head.predict(images, features, sampled)
        r = labels.numel()
        exp_cls = sum(-F.log_softmax(logits[i], 0)[labels[i]].item() for i in range(r)) / r
        exp_box = 0.0
        for i in range(r):
            k = int(labels[i])
            if k == 0:
                continue
            d = deltas[i] if agnostic else deltas[i, 4 * (k - 1) : 4 * k]
            for e in (d - box_targets[i]).abs().tolist():
                exp_box += 0.5 * e * e if e < 1 else e - 0.5
        exp_box /= r
    assert int((labels > 0).sum()) >= 5 and exp_box > 0.01
    assert losses["loss_cls"].item() == pytest.approx(exp_cls, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(exp_box, rel=1e-5)
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert head.predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_forward_with_an_empty_gt_image_in_the_batch():
    torch.manual_seed(0)
    head = make_head(bg_lo=0.0).train()
    features = {"p": torch.randn(2, C, 8, 8, requires_grad=True)}
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    props = [Proposals(PROPOSALS[:3], torch.ones(3)), Proposals(PROPOSALS[3:], torch.ones(3))]
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 64)])
    detections, losses = head(images, features, props, [TARGET, empty])
    assert detections == []  # training mode: no inference
    assert torch.isfinite(losses["loss_cls"]) and torch.isfinite(losses["loss_box"])
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert features["p"].grad is not None
    # a batch of only the empty image: box loss exactly 0
    _, losses = head(images, features, props[1:] + props[1:], [empty, empty])
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() > 0


def test_forward_batch_without_any_sampled_roi():
    # Fast R-CNN's bg band [0.1, 0.5): images without objects have only IoU-0 proposals, all
    # ignored; a batch of such images samples nothing and must give zero losses, not crash.
    torch.manual_seed(0)
    head = make_head(bg_lo=0.1).train()
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    _, losses = head(images, {"p": torch.randn(1, C, 8, 8)}, [Proposals(PROPOSALS, torch.ones(6))], [empty])
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box"].item() == 0.0


def test_proposals_requiring_grad_are_rejected():
    head = make_head()
    boxes = PROPOSALS.clone().requires_grad_()
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    with pytest.raises(AssertionError, match="detached"):
        head(images, {"p": torch.randn(1, C, 8, 8)}, [Proposals(boxes, torch.ones(6))], [TARGET])


# ----------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------

# Image (h, w) = (80, 100), K = 2. Class probabilities [bg, c1, c2] (logits = their logs):
#   b0 [0,0,10,10]      [0.1, 0.8, 0.1]
#   b1 [1,0,11,10]      [0.1, 0.2, 0.7]   IoU(b0, b1) = 90/110 = 0.82; its class-2 deltas
#                                          (1, 0, 0, 0) / 10 move that box 1 px right: [2,0,12,10]
#   b2 [50,50,60,60]    [0.97, 0.02, 0.01] below the 0.05 threshold
#   b3 [-5,-5,120,90]   [0.35, 0.4, 0.25]  clipped to [0,0,100,80]
#   b4 [120,0,130,10]   [0.1, 0.89, 0.01]  clipped to [100,0,100,10]: zero width, dropped
# Class 1: b0 (0.8) suppresses b1 (0.2, IoU 0.82 > 0.5); b3 (0.4) overlaps b0 by 100/8000.
# Class 2: b1's box [2,0,12,10] (0.7) suppresses b0's (0.1, IoU 80/120 = 0.67).
# Different classes never suppress each other: b0 (c1) and b1 (c2) are both kept.
INF_BOXES = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [-5, -5, 120, 90], [120, 0, 130, 10]])
INF_PROBS = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.97, 0.02, 0.01], [0.35, 0.4, 0.25], [0.1, 0.89, 0.01]])


def _inference(head, deltas=None, boxes=INF_BOXES, probs=INF_PROBS, size=(80, 100)):
    if deltas is None:
        deltas = torch.zeros(len(boxes), 8)
        deltas[1, 4] = 1.0
    return head.inference(probs.log(), deltas, [boxes], [size])


def test_inference_hand_made():
    (det,) = _inference(make_head())
    assert isinstance(det, Detections)
    torch.testing.assert_close(
        det.boxes, torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [0, 0, 100, 80], [0, 0, 100, 80]])
    )
    torch.testing.assert_close(det.scores, torch.tensor([0.8, 0.7, 0.4, 0.25]))
    assert det.labels.tolist() == [1, 2, 1, 2]


def test_inference_score_threshold_and_cap():
    (det,) = _inference(make_head(score_thresh=0.75))
    assert det.labels.tolist() == [1] and det.scores.tolist() == pytest.approx([0.8])
    (det,) = _inference(make_head(detections_per_img=2))
    assert det.labels.tolist() == [1, 2] and det.scores.tolist() == pytest.approx([0.8, 0.7])
    # threshold 0.015: b2's class 1 (0.02) now passes, its class 2 (0.01) does not
    (det,) = _inference(make_head(score_thresh=0.015))
    assert det.scores.tolist() == pytest.approx([0.8, 0.7, 0.4, 0.25, 0.02])


def test_inference_nms_threshold_matters():
    # NMS at 0.9: IoU(b0, b1) = 0.82 no longer suppresses -> b1's class 1 (0.2) comes back;
    # class 2: IoU([0,0,10,10], [2,0,12,10]) = 0.67 -> b0's class 2 (0.1) comes back.
    (det,) = _inference(make_head(nms_thresh=0.9))
    assert det.scores.tolist() == pytest.approx([0.8, 0.7, 0.4, 0.25, 0.2, 0.1])
    assert det.labels.tolist() == [1, 2, 1, 2, 1, 2]


def test_inference_class_agnostic_boxes_and_several_images():
    head = make_head(agnostic=True)
    boxes2 = torch.tensor([[10.0, 10, 30, 30]])
    probs2 = torch.tensor([[0.2, 0.1, 0.7]])
    deltas = torch.zeros(6, 4)
    deltas[5] = torch.tensor([0.0, 0.0, 5 * math.log(2), 0.0])  # image 2: width doubles -> [0,10,40,30]
    dets = head.inference(torch.cat([INF_PROBS, probs2]).log(), deltas, [INF_BOXES, boxes2], [(80, 100), (30, 35)])
    assert len(dets) == 2
    # one box for both classes: class 2 of b0 and b1 are the same boxes as class 1's
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.8, 0.7, 0.4, 0.25]))
    torch.testing.assert_close(dets[0].boxes[:2], torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]]))
    # image 2 is clipped to its own size (h 30, w 35): [0, 10, 40, 30] -> [0, 10, 35, 30]
    torch.testing.assert_close(dets[1].boxes, torch.tensor([[0.0, 10, 35, 30], [0, 10, 35, 30]]))
    assert dets[1].labels.tolist() == [2, 1]


def test_eval_forward_returns_detections_and_losses_when_targets_given():
    torch.manual_seed(0)
    head = make_head(score_thresh=0.0).eval()
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    features = {"p": torch.randn(1, C, 8, 8)}
    props = [Proposals(PROPOSALS, torch.ones(6))]
    dets, losses = head(images, features, props)
    assert losses == {} and len(dets) == 1
    # untrained head: ~uniform scores 1/3 for 2 classes; nothing is thresholded at 0
    assert len(dets[0]) > 0 and dets[0].scores.max() < 0.4
    dets, losses = head(images, features, props, [TARGET])
    assert set(losses) == {"loss_cls", "loss_box"} and len(dets) == 1


def test_mlp_head_and_predictor_shapes():
    head = MLPBoxHead(12, (8, 6), dropout=0.5)
    assert head.fc_names == ["fc6", "fc7"] and head.out_features == 6
    assert head(torch.randn(5, 3, 2, 2)).shape == (5, 6)
    logits, deltas = FastRCNNPredictor(6, 3)(torch.randn(5, 6))
    assert logits.shape == (5, 4) and deltas.shape == (5, 12)  # K + 1 logits, 4K deltas
    _, deltas = FastRCNNPredictor(6, 3, class_agnostic=True)(torch.randn(5, 6))
    assert deltas.shape == (5, 4)


def test_predictor_init_gaussian_and_pytorch():
    torch.manual_seed(0)
    d = 400
    paper = FastRCNNPredictor(d, 20)
    # Fast R-CNN sec. 2.2: N(0, 0.01) / N(0, 0.001), zero biases (21 x 400 / 80 x 400 draws).
    assert abs(paper.cls_score.weight.std().item() - 0.01) < 0.0005
    assert abs(paper.bbox_pred.weight.std().item() - 0.001) < 0.00005
    assert paper.cls_score.bias.abs().sum() == 0 and paper.bbox_pred.bias.abs().sum() == 0
    plain = FastRCNNPredictor(d, 20, init="pytorch")
    # nn.Linear's default: U(-1/sqrt(d), 1/sqrt(d)) for weights and biases, std bound / sqrt(3).
    bound = 1 / d**0.5
    for layer in (plain.cls_score, plain.bbox_pred):
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert abs(layer.weight.std().item() - bound / 3**0.5) < 0.1 * bound / 3**0.5
        assert layer.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="init: one of gaussian, pytorch, got 'xavier'"):
        FastRCNNPredictor(d, 20, init="xavier")

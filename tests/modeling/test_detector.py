"""Tests of detkit.modeling.detector: mapping detections back to original pixels, difficult
boxes and the training targets, losses in eval mode, loss weights, and frozen BatchNorm
staying in eval mode. The proposal generator and head are stubs recording what they get,
so each rule is checked on its own."""

import pytest
import torch
from torch import nn

from detkit.modeling.backbones.fpn import FPN
from detkit.modeling.backbones.tiny import TinyResNetBody
from detkit.modeling.detector import Detector, map_to_original
from detkit.structures import Detections, Geometry, ImageList, Proposals, Target


def test_map_to_original_scales_per_axis():
    # resized (h, w) = (50, 100) from original (100, 150): x * 150/100 = 1.5, y * 100/50 = 2
    det = Detections(torch.tensor([[10.0, 10.0, 20.0, 30.0]]), torch.tensor([0.9]), torch.tensor([3]))
    images = ImageList(torch.zeros(1, 3, 64, 128), [(50, 100)], [Geometry((100, 150), (50, 100))])
    (out,) = map_to_original([det], images)
    torch.testing.assert_close(out.boxes, torch.tensor([[15.0, 20.0, 30.0, 60.0]]))
    assert out.scores.tolist() == pytest.approx([0.9]) and out.labels.tolist() == [3]


def test_map_to_original_per_image_and_without_geometries():
    dets = [Detections(torch.tensor([[4.0, 4.0, 8.0, 8.0]]), torch.ones(1), torch.ones(1, dtype=torch.int64))] * 2
    images = ImageList(
        torch.zeros(2, 3, 32, 32), [(32, 32), (16, 32)], [Geometry((64, 64), (32, 32)), Geometry((16, 8), (16, 32))]
    )
    a, b = map_to_original(dets, images)
    torch.testing.assert_close(a.boxes, torch.tensor([[8.0, 8.0, 16.0, 16.0]]))  # x2 both axes
    torch.testing.assert_close(b.boxes, torch.tensor([[1.0, 4.0, 2.0, 8.0]]))  # x 8/32, y 16/16
    assert map_to_original(dets, ImageList(torch.zeros(2, 3, 32, 32), [(32, 32)] * 2)) is dets


class StubBackbone(nn.Module):
    out_features = ["p"]
    out_channels = 2
    out_strides = {"p": 1}
    size_divisibility = 32

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"p": self.conv(x)}


class StubProposals(nn.Module):
    """Proposals are the whole image; losses 2 and 3 (only with targets)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images, features, targets=None):
        self.seen.append(targets)
        props = [Proposals(torch.tensor([[0.0, 0.0, w, h]]) * self.scale, torch.ones(1)) for h, w in images.image_sizes]
        losses = {} if targets is None else {"loss_rpn_cls": 2.0 * self.scale, "loss_rpn_box": 3.0 * self.scale}
        return props, losses


class StubHead(nn.Module):
    """Detects its proposals (in network-input pixels); losses 5 and 7 with targets."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.seen = []
        self.proposals_seen = []

    def forward(self, images, features, proposals, targets=None):
        self.seen.append(targets)
        self.proposals_seen.append(proposals)
        dets = [Detections(p.boxes, p.scores, torch.ones(len(p), dtype=torch.int64)) for p in proposals]
        losses = {} if targets is None else {"loss_cls": torch.tensor(5.0), "loss_box": torch.tensor(7.0)}
        return (dets if not self.training else []), losses


def stub_detector(**kw):
    return Detector(StubBackbone(), StubProposals(), StubHead(), **kw)


IMAGES = ImageList(
    torch.zeros(2, 3, 40, 60), [(40, 60), (30, 20)], [Geometry((80, 120), (40, 60)), Geometry((60, 10), (30, 20))]
)
TARGETS = [
    Target(
        torch.tensor([[1.0, 1, 5, 5], [2, 2, 9, 9], [3, 3, 4, 4]]),
        torch.tensor([1, 2, 3]),
        torch.tensor([False, True, False]),
    ),
    Target(torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([2]), torch.tensor([True])),
]


def test_difficult_boxes_removed_from_training_targets():
    model = stub_detector().train()
    model(IMAGES, TARGETS)
    for seen in (model.proposal_generator.seen[-1], model.roi_head.seen[-1]):
        assert seen[0].boxes.tolist() == [[1.0, 1, 5, 5], [3, 3, 4, 4]]
        assert seen[0].labels.tolist() == [1, 3]
        assert seen[0].difficult.tolist() == [False, False]
        assert seen[1].boxes.shape == (0, 4) and seen[1].labels.tolist() == []


def test_train_difficult_keeps_them():
    model = stub_detector(train_difficult=True).train()
    model(IMAGES, TARGETS)
    seen = model.roi_head.seen[-1]
    assert seen[0].labels.tolist() == [1, 2, 3] and seen[1].labels.tolist() == [2]


def test_targets_without_difficult_flags():
    model = stub_detector().train()
    model(IMAGES, [Target(t.boxes, t.labels) for t in TARGETS])
    assert model.roi_head.seen[-1][0].labels.tolist() == [1, 2, 3]


def test_training_mode_returns_losses_and_no_detections():
    model = stub_detector().train()
    detections, losses = model(IMAGES, TARGETS)
    assert detections == []
    assert {k: v.item() for k, v in losses.items()} == {
        "loss_rpn_cls": 2.0,
        "loss_rpn_box": 3.0,
        "loss_cls": 5.0,
        "loss_box": 7.0,
    }


def test_eval_with_targets_gives_losses_and_detections_in_original_pixels():
    model = stub_detector().eval()
    detections, losses = model(IMAGES, TARGETS)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    # proposals cover the resized image: [0, 0, 60, 40] -> x2 -> [0, 0, 120, 80];
    # image 2: [0, 0, 20, 30] -> x 10/20, y 60/30 -> [0, 0, 10, 60]
    torch.testing.assert_close(detections[0].boxes, torch.tensor([[0.0, 0.0, 120.0, 80.0]]))
    torch.testing.assert_close(detections[1].boxes, torch.tensor([[0.0, 0.0, 10.0, 60.0]]))
    detections, losses = model(IMAGES)  # no targets: no losses
    assert losses == {} and len(detections) == 2


def test_loss_weights_multiply_named_terms_only():
    model = stub_detector(loss_weights={"loss_rpn_box": 0.5, "loss_cls": 2.0, "loss_unused": 9.0}).train()
    _, losses = model(IMAGES, TARGETS)
    assert {k: v.item() for k, v in losses.items()} == {
        "loss_rpn_cls": 2.0,
        "loss_rpn_box": 1.5,
        "loss_cls": 10.0,
        "loss_box": 7.0,
    }


def test_proposals_reach_the_head_detached():
    model = stub_detector().train()
    model(IMAGES, TARGETS)
    assert all(not p.boxes.requires_grad for p in model.roi_head.proposals_seen[-1])


def test_frozen_batchnorm_stays_in_eval_after_train():
    body = TinyResNetBody(frozen_stages=1)  # stem frozen, layer1.. train
    model = Detector(FPN(body, 8), StubProposals(), StubHead())
    model.train()
    assert model.training and not body.stem[1].training  # frozen BN: eval
    assert body.layer1[0].bn1.training  # trainable BN: train
    stats = body.stem[1].running_mean.clone()
    body(torch.randn(2, 3, 32, 32) * 5 + 3)
    torch.testing.assert_close(body.stem[1].running_mean, stats)  # statistics not updated
    model.eval()
    assert not body.layer1[0].bn1.training
    model.train()
    assert not body.stem[1].training and body.layer1[0].bn1.training
    assert not any(p.requires_grad for p in body.stem.parameters())


def test_size_divisibility_from_backbone():
    backbone = StubBackbone()
    backbone.size_divisibility = 16
    assert Detector(backbone, StubProposals(), StubHead()).size_divisibility == 16


class NoStridesBackbone(nn.Module):
    out_features = ["p"]
    out_channels = 2

    def forward(self, x):
        return {"p": x}


class NoClassesHead(nn.Module):
    def forward(self, images, features, proposals, targets=None):
        return [], {}


def test_parts_must_implement_the_interfaces():
    # no silent defaults (a padding multiple of 32, ...): a part lacking a member is refused
    with pytest.raises(
        TypeError,
        match="backbone NoStridesBackbone does not implement .*Backbone: it lacks out_strides, size_divisibility",
    ):
        Detector(NoStridesBackbone(), StubProposals(), StubHead())
    with pytest.raises(TypeError, match="RoI head NoClassesHead does not implement .*RoIHead: it lacks num_classes"):
        Detector(StubBackbone(), StubProposals(), NoClassesHead())
    with pytest.raises(
        TypeError,
        match=r"proposal generator Linear does not implement .*ProposalGenerator: "
        r"its forward does not take \(images, features, targets\)",
    ):
        Detector(StubBackbone(), nn.Linear(1, 1), StubHead())

"""Tests of detkit.build's model half: schema defaults + the tiny backbone build a working
Faster R-CNN (FPN and single map), which trains (losses, backward) and predicts in original
pixels on a batch of two differently sized images; the config reaches the parts it names."""

import pytest
import torch

from detkit.config import from_dict
from detkit.errors import ConfigError
from detkit.modeling.build import build_model
from detkit.schema import ModelConfig
from detkit.structures import Geometry, ImageList, Target

LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}


def fpn_cfg(**extra):
    # schema defaults (ResNet-50 FPN recipe) with the tiny body and narrow FPN channels
    return from_dict(ModelConfig, {"backbone": {"name": "tiny", "out_channels": 32}, **extra})


def c4_cfg(**extra):
    # single stride-16 map: one anchor level with the Faster R-CNN paper's 3 x 3 anchors; the
    # default fast_rcnn head on it is the "C4 + 2fc" head (the ResNet paper's is res5)
    return from_dict(
        ModelConfig, {"backbone": {"name": "tiny", "fpn": False}, "anchors": {"sizes": [[32, 64, 128]]}, **extra}
    )


def batch(model):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 80, 60, generator=g)]
    # originals twice the network input: detections must come back x2
    geometries = [Geometry((128, 192), (64, 96)), Geometry((160, 120), (80, 60))]
    images = ImageList.from_tensors(tensors, size_divisibility=model.size_divisibility, geometries=geometries)
    targets = [
        Target(torch.tensor([[10.0, 8.0, 40.0, 50.0], [50.0, 20.0, 90.0, 60.0]]), torch.tensor([1, 3])),
        Target(torch.tensor([[5.0, 30.0, 35.0, 75.0]]), torch.tensor([2])),
    ]
    return images, targets


@pytest.mark.parametrize("make_cfg", [fpn_cfg, c4_cfg], ids=["fpn", "c4"])
def test_build_train_backward_and_eval(make_cfg):
    torch.manual_seed(0)
    model = build_model(make_cfg(), num_classes=3)
    images, targets = batch(model)
    h, w = images.tensor.shape[-2:]
    assert h % model.size_divisibility == 0 and w % model.size_divisibility == 0
    assert images.image_sizes == [(64, 96), (80, 60)]

    model.train()
    detections, losses = model(images, targets)
    assert detections == [] and set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_rpn_cls"].item() > 0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    for module in (model.backbone, model.proposal_generator.head, model.roi_head.predictor):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0

    model.eval()
    with torch.no_grad():
        detections, losses = model(images)
        assert losses == {} and len(detections) == 2
        for det, (oh, ow) in zip(detections, [g.orig_size for g in images.geometries]):
            assert det.boxes.shape[1] == 4 and len(det) <= 100
            assert ((det.labels >= 1) & (det.labels <= 3)).all()
            assert (det.boxes[:, 0::2] <= ow).all() and (det.boxes[:, 1::2] <= oh).all()
        # validation loss in eval mode
        _, losses = model(images, targets)
        assert set(losses) == LOSS_KEYS


def test_detections_are_mapped_to_original_pixels():
    torch.manual_seed(0)
    model = build_model(fpn_cfg(roi_head={"score_thresh": 0.0}), num_classes=3).eval()
    images, _ = batch(model)
    with torch.no_grad():
        original = model(images)[0]
        images.geometries = None  # no originals: boxes stay in network-input pixels
        resized = model(images)[0]
    for a, b in zip(original, resized):
        assert len(a) > 0
        torch.testing.assert_close(a.boxes, b.boxes * 2)  # orig = 2 x input on both axes


def test_fpn_wiring_follows_the_config():
    cfg = fpn_cfg(
        roi_head={"pooler": "roi_pool", "bg_iou_thresh_lo": 0.1, "class_agnostic": True},
        loss_weights={"loss_rpn_box": 2.0},
    )
    model = build_model(cfg, num_classes=4)
    rpn, head = model.proposal_generator, model.roi_head
    assert rpn.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert rpn.anchor_generator.strides == [4, 8, 16, 32, 64]
    assert rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0) and rpn.smooth_l1_beta == pytest.approx(1 / 9)
    assert rpn.matcher.labels == [0, -1, 1] and rpn.matcher.allow_low_quality_matches
    assert rpn.pre_nms_topk == (2000, 1000) and rpn.post_nms_topk == (2000, 1000)
    # the head pools from P2..P5 only (P6 serves the RPN), FPN paper sec. 4.2
    assert head.in_features == ["p2", "p3", "p4", "p5"]
    assert head.pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32] and head.pooler.kind == "roi_pool"
    assert head.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert head.matcher.labels == [-1, 0, 1] and not head.matcher.allow_low_quality_matches
    assert head.predictor.cls_score.out_features == 5 and head.predictor.bbox_pred.out_features == 4
    assert model.loss_weights == {"loss_rpn_box": 2.0}
    # bg_iou_thresh_lo 0 (the default): everything below 0.5 is background
    assert build_model(fpn_cfg(), 4).roi_head.matcher.labels == [0, 0, 1]
    assert build_model(fpn_cfg(), 4).roi_head.predictor.bbox_pred.out_features == 16
    # predictor_init: the paper's zero biases by default, nn.Linear's uniform ones on request
    assert build_model(fpn_cfg(), 4).roi_head.predictor.cls_score.bias.abs().sum() == 0
    plain = build_model(fpn_cfg(roi_head={"predictor_init": "pytorch"}), 4).roi_head.predictor
    assert plain.cls_score.bias.abs().sum() > 0


def test_single_map_wiring():
    model = build_model(c4_cfg(), num_classes=2)
    assert model.size_divisibility == 16 and model.backbone.out_channels == 64
    assert model.proposal_generator.in_features == ["c4"] == model.roi_head.in_features
    assert model.proposal_generator.anchor_generator.num_anchors_per_location() == [9]
    assert model.proposal_generator.head.cls_logits.out_channels == 9


@pytest.mark.parametrize(
    "anchors",
    [
        {"sizes": [[32], [64, 128], [128], [256], [512]]},  # 1 vs 2 anchors per location
        {"sizes": [[32], [64], [128], [256], [512]], "aspect_ratios": [[1.0], [0.5, 1.0], [1.0], [1.0], [1.0]]},
    ],
)
def test_anchor_count_mismatch_between_levels_raises(anchors):
    with pytest.raises(
        ConfigError, match=r"model.anchors.sizes / aspect_ratios: the shared RPN head needs the same number"
    ):
        build_model(fpn_cfg(anchors=anchors), num_classes=3)


def test_anchor_levels_must_match_feature_levels():
    cfg = from_dict(ModelConfig, {"backbone": {"name": "tiny", "fpn": False}})  # 5 sizes, 1 map
    with pytest.raises(
        ConfigError,
        match=r"^model.anchors.sizes: 5 levels, but the backbone \(tiny, fpn: false\) gives 1 feature map \(c4\)",
    ):
        build_model(cfg, num_classes=3)


def test_tiny_backbone_has_no_pretrained_weights():
    cfg = from_dict(ModelConfig, {"backbone": {"name": "tiny", "pretrained": "x.pth"}})
    with pytest.raises(ConfigError, match="^model.backbone.pretrained: the tiny backbone has no pretrained weights"):
        build_model(cfg, num_classes=3)


def test_channels_last_inference_gives_the_same_detections_and_not_in_training():
    torch.manual_seed(0)
    model = build_model(fpn_cfg(roi_head={"score_thresh": 0.0}), num_classes=3)
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images, targets = batch(model)
    model.train()
    model(images, targets)
    model.eval()
    with torch.no_grad():
        fast, _ = model(images)
        model.channels_last_inference = False
        plain, _ = model(images)
    assert seen == [False, True, False]
    for a, b in zip(fast, plain):
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
        assert torch.equal(a.labels, b.labels)


def test_vgg_fc6_fc7_are_handed_to_the_box_head(monkeypatch, caplog):
    # The builder hands VGG-16's ImageNet fc6/fc7 to the Fast R-CNN head explicitly (Fast
    # R-CNN sec. 2.2) when the head has their shape; another shape keeps the head's own init.
    import torchvision

    from detkit.modeling import build as build_module

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)  # stands in for the ImageNet weights
    monkeypatch.setattr(build_module, "torchvision_vgg16", lambda norm, pretrained: net)
    vgg = {
        "backbone": {"name": "vgg16", "fpn": False, "norm": "none", "pretrained": "VGG16_Weights.IMAGENET1K_V1"},
        "anchors": {"sizes": [[128, 256, 512]]},
        "roi_head": {"pooler": "roi_pool", "fc_dims": [4096, 4096]},
    }
    head = build_model(from_dict(ModelConfig, vgg), num_classes=2).roi_head
    assert torch.equal(head.box_head.fc6.weight, net.classifier[0].weight)
    assert torch.equal(head.box_head.fc7.bias, net.classifier[3].bias)
    assert head.box_head.fc6.weight.data_ptr() != net.classifier[0].weight.data_ptr()  # a copy

    vgg["roi_head"]["fc_dims"] = [64, 64]
    with caplog.at_level("INFO", logger="detkit"):
        head = build_model(from_dict(ModelConfig, vgg), num_classes=2).roi_head
    assert head.box_head.fc6.weight.shape == (64, 25088)
    assert "VGG-16's fc6/fc7 weights not used" in caplog.text
    # without pretrained weights nothing is handed over
    vgg["backbone"]["pretrained"] = None
    vgg["roi_head"]["fc_dims"] = [4096, 4096]
    head = build_model(from_dict(ModelConfig, vgg), num_classes=2).roi_head
    assert not torch.equal(head.box_head.fc6.weight, net.classifier[0].weight)

"""Tests of detkit.modeling.heads.res5 (the ResNet paper's C4 head): hand-computed shapes
(14 x 14 RoIs -> res5 with a stride-2 first block -> 7 x 7 -> average pooling), the pooled
features against an independent torchvision.ops computation, the hand-over of the backbone
network's own (pretrained) layer4, config checks, and training on a few generated shapes
images (the loss falls)."""

import pytest
import torch
import torchvision
from torchvision.ops import roi_align

from detkit.config import from_dict
from detkit.data.shapes import render_shapes_image
from detkit.data.transforms import Normalize
from detkit.errors import ConfigError
from detkit.modeling.build import build_model
from detkit.modeling.fold import FoldedNorm, FrozenNormConv2d
from detkit.modeling.heads.res5 import Res5Head
from detkit.schema import ModelConfig
from detkit.structures import ImageList, Proposals, Target

WIDTHS = [8, 16, 24, 40]  # tiny c2..c5: C4 has 24 channels, res5 40


def res5_cfg(**extra):
    return from_dict(
        ModelConfig,
        {
            "backbone": {"name": "tiny", "fpn": False, "tiny_widths": WIDTHS},
            "anchors": {"sizes": [[16, 32, 64]], "aspect_ratios": [[0.5, 1.0, 2.0]]},
            "roi_head": {"name": "res5", "pooler_resolution": 14, "sampling_ratio": 2, **extra.pop("roi_head", {})},
            **extra,
        },
    )


def test_res5_shapes_by_hand():
    torch.manual_seed(0)
    model = build_model(res5_cfg(), num_classes=3)
    head = model.roi_head
    assert isinstance(head, Res5Head) and head.in_features == ["c4"]
    assert head.pooler.output_size == 14 and head.pooler.scales == [1 / 16]
    # the first block of res5 has stride 2 (its 3x3 conv and the 1x1 shortcut), the rest 1
    first = head.res5[0]
    assert first.conv1.stride == (2, 2) and first.downsample[0].stride == (2, 2)
    assert first.conv1.in_channels == 24 and first.conv2.out_channels == 40
    # the backbone stops at C4: layer4 lives in the head only, once
    assert model.backbone.body.stage_names == ["layer1", "layer2", "layer3"]
    assert not hasattr(model.backbone.body, "layer4")
    assert head.predictor.cls_score.in_features == 40 and head.predictor.cls_score.out_features == 4  # K + 1
    assert head.predictor.bbox_pred.out_features == 12  # 4K, class-specific

    seen = {}
    head.res5.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].shape, out=out.shape))
    head.eval()
    features = {"c4": torch.randn(2, 24, 6, 8)}  # input 96 x 128 at stride 16
    boxes = [torch.tensor([[0.0, 0, 40, 30], [10, 20, 90, 80]]), torch.tensor([[5.0, 5, 60, 60]])]
    with torch.no_grad():
        region = head.region_features(features, boxes)
    # 14 x 14 pooled; 3x3 stride-2 conv with padding 1: floor((14 + 2 - 3) / 2) + 1 = 7
    assert seen == {"inp": (3, 24, 14, 14), "out": (3, 40, 7, 7)}
    assert region.shape == (3, 40)
    # independently: torchvision's RoIAlign, the same res5, global average pooling
    with torch.no_grad():
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        pooled = roi_align(features["c4"], rois, 14, 1 / 16, 2, False)
        expected = head.res5(pooled).mean(dim=(2, 3))
    torch.testing.assert_close(region, expected, rtol=1e-5, atol=1e-6)


def test_res5_odd_pooled_size_rounds_up():
    torch.manual_seed(0)
    head = build_model(res5_cfg(roi_head={"pooler_resolution": 7}), num_classes=2).roi_head.eval()
    out = head.res5(torch.randn(1, 24, 7, 7))
    assert out.shape == (1, 40, 4, 4)  # floor((7 + 2 - 3) / 2) + 1 = 4


def test_resnet50_res5_is_torchvision_layer4_with_stride_two():
    cfg = from_dict(
        ModelConfig,
        {
            "backbone": {"name": "resnet50", "fpn": False, "norm": "frozen_bn"},
            "anchors": {"sizes": [[32, 64, 128, 256, 512]]},
            "roi_head": {"name": "res5", "pooler_resolution": 14},
        },
    )
    head = build_model(cfg, num_classes=20).roi_head
    assert len(head.res5) == 3 and head.res5[0].conv1.in_channels == 1024
    # torchvision's bottleneck strides its 3x3 conv (detectron2 / MSRA: the 1x1, STRIDE_IN_1X1)
    assert head.res5[0].conv1.stride == (1, 1) and head.res5[0].conv2.stride == (2, 2)
    assert head.predictor.cls_score.in_features == 2048
    # BN fixed, as the paper: folded into the conv before it (modeling.fold), or kept apart
    assert isinstance(head.res5[0].bn1, FoldedNorm) and isinstance(head.res5[0].conv1, FrozenNormConv2d)
    cfg.fold_batchnorm = False
    head = build_model(cfg, num_classes=20).roi_head
    assert isinstance(head.res5[0].bn1, torchvision.ops.FrozenBatchNorm2d)


def test_pretrained_layer4_is_handed_to_the_head(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    cfg = from_dict(
        ModelConfig,
        {
            "backbone": {
                "name": "resnet18",
                "fpn": False,
                "norm": "frozen_bn",
                "pretrained": str(tmp_path / "r18.pth"),
            },
            "anchors": {"sizes": [[32, 64, 128]]},
            "roi_head": {"name": "res5"},
        },
    )
    torch.manual_seed(1)  # another random init: equality means the weights were loaded
    model = build_model(cfg, num_classes=2)
    res5 = model.roi_head.res5.state_dict()
    expected = {k: v for k, v in reference.layer4.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(res5) == set(expected)  # frozen BN: weight, bias, running mean / var
    for name, value in expected.items():
        torch.testing.assert_close(res5[name], value, msg=name)
    torch.testing.assert_close(model.backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    # one copy: the parameters live in the head, the state dict names them there only
    keys = model.state_dict().keys()
    assert "roi_head.res5.0.conv1.weight" in keys and not any(k.startswith("backbone.body.layer4") for k in keys)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"backbone": {"name": "tiny", "fpn": True}}, r"model.roi_head.name: res5 .* got tiny with fpn: true"),
        (
            {"backbone": {"name": "vgg16", "fpn": False, "norm": "none"}, "anchors": {"sizes": [[64]]}},
            r"needs a ResNet or tiny backbone .* got vgg16",
        ),
    ],
)
def test_res5_needs_a_single_c4_map_of_a_residual_network(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(from_dict(ModelConfig, {**cfg, "roi_head": {"name": "res5"}}), num_classes=2)


def _shapes_batch(n):
    normalize = Normalize()
    images, targets = [], []
    for i in range(n):
        rendered = render_shapes_image("train", i, seed=0, image_size=[96, 128], object_size=[20, 48])
        t = torch.from_numpy(rendered.image).permute(2, 0, 1).float() / 255.0
        images.append(normalize(t, None)[0])
        boxes = torch.tensor([[b[0], b[1], b[2] + 1, b[3] + 1] for b in (o.box for o in rendered.objects)]).float()
        targets.append(Target(boxes, torch.tensor([o.label for o in rendered.objects])))
    return ImageList.from_tensors(images, 16), targets


def test_res5_head_trains_on_generated_shapes(one_thread):
    # The same base (labelling, sampling, losses) with the res5 predictor learns: over 40 SGD
    # iterations on 4 generated images the head's loss falls by more than half.
    torch.manual_seed(0)
    cfg = res5_cfg(roi_head={"batch_size_per_image": 32, "smooth_l1_beta": 0.0, "cpu_sparse_roi_align": False})
    cfg.proposals.rpn.post_nms_topk_train = 100
    model = build_model(cfg, num_classes=3).train()
    images, targets = _shapes_batch(4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    head_losses = []
    for _ in range(40):
        _, losses = model(images, targets)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
        head_losses.append(float(losses["loss_cls"].detach() + losses["loss_box"].detach()))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    first, last = sum(head_losses[:5]) / 5, sum(head_losses[-5:]) / 5
    assert last < 0.5 * first, head_losses
    # and its detections on those images find the objects (eval mode, same base inference)
    model.eval()
    with torch.no_grad():
        detections, _ = model(images)
    assert all(len(d) > 0 for d in detections)
    assert all(set(d.labels.tolist()) <= {1, 2, 3} for d in detections)


def test_res5_head_forward_in_eval_gives_detections_and_validation_loss():
    torch.manual_seed(0)
    model = build_model(res5_cfg(roi_head={"score_thresh": 0.0}), num_classes=3).eval()
    images, targets = _shapes_batch(2)
    with torch.no_grad():
        features = model.backbone(images.tensor)
        props = [Proposals(t.boxes + 2.0, torch.ones(len(t))) for t in targets]
        detections, losses = model.roi_head(images, features, props, targets)
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    assert len(detections) == 2 and all(len(d) > 0 for d in detections)

"""AlexNet backbone: torchvision's definition layer by layer (same numbers as torchvision's
AlexNet for the same weights), conv5 at stride 16, pool5 = 9216 features, BN/GN variants for
training from scratch, pretrained weights from a local file with the fc6/fc7 hand-over through
the builder's HandOver (into R-CNN's and SPP-net's fc layers), and the config checks."""

import pytest
import torch
import torchvision

from detkit.config import from_dict
from detkit.errors import BackboneError, ConfigError
from detkit.modeling.backbones.alexnet import POOL5_FEATURES, AlexNetBody, alexnet_fc_state, torchvision_alexnet
from detkit.modeling.build import BACKBONES, build_model
from detkit.schema import BackboneConfig, ModelConfig


def test_same_function_as_torchvision_alexnet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    net = torchvision_alexnet(str(tmp_path / "alexnet.pth"))
    body = AlexNetBody(net, norm="none").eval()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        conv5 = body(x)["c4"]
        expected_conv5 = tv.features[:12](x)  # up to conv5 + ReLU
        torch.testing.assert_close(conv5, expected_conv5)
        pool5 = body.pool5(conv5)
        torch.testing.assert_close(pool5, torch.flatten(tv.avgpool(tv.features(x)), 1))
    assert pool5.shape == (2, POOL5_FEATURES) and conv5.shape == (2, 256, 13, 13)  # 227 px -> 13 x 13
    # fc6 / fc7 for the head
    fc = alexnet_fc_state(net)
    assert torch.equal(fc["fc6.weight"], tv.classifier[1].weight)
    assert torch.equal(fc["fc7.bias"], tv.classifier[4].bias)
    # at R-CNN's 227 px, conv5 is 13 x 13 and the 3 x 3 / 2 max-pool is adaptive max pooling
    # to 6 x 6 (R-CNN's head pools conv5 that way, for any network and crop size)
    pooled = torch.nn.functional.adaptive_max_pool2d(conv5, 6).flatten(1)
    torch.testing.assert_close(pooled, pool5, rtol=0, atol=0)


@pytest.mark.parametrize("size,expected", [(224, 13), (384, 23), (96, 5)])
def test_conv5_is_at_stride_16(size, expected):
    # conv1: floor((s + 4 - 11) / 4) + 1; two 3/2 max-pools: floor((n - 3) / 2) + 1 each
    n = (size + 4 - 11) // 4 + 1
    n = (n - 3) // 2 + 1
    n = (n - 3) // 2 + 1
    assert n == expected
    body = AlexNetBody(norm="bn")
    assert body(torch.zeros(1, 3, size, size))["c4"].shape[-1] == expected
    assert body.out_strides == {"c4": 16} and body.out_channels_per_feature == {"c4": 256}


def test_norm_variants_and_freezing():
    bn = AlexNetBody(norm="bn", frozen_stages=2)
    norms = [m for m in bn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 5  # one after every convolution
    assert not any(p.requires_grad for p in bn.conv1.parameters())
    assert not any(p.requires_grad for p in bn.conv2.parameters())
    assert all(p.requires_grad for p in bn.conv3.parameters())
    gn = AlexNetBody(norm="gn")
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in gn.modules()) == 5
    _, hand_over = BACKBONES["alexnet"](BackboneConfig(name="alexnet", fpn=False, norm="bn"), ["c4"], False)
    assert hand_over.fc_state is None  # no pretrained weights: nothing to hand over


@pytest.mark.parametrize("head", ["rcnn", "spp"])
def test_imagenet_fc6_fc7_reach_the_head(head, tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    roi_head = {"name": head, "fc_dims": [4096, 4096], "pooler_resolution": 6, "spp_levels": [6]}
    cfg = from_dict(
        ModelConfig,
        {
            "backbone": {"name": "alexnet", "fpn": False, "norm": "none", "pretrained": str(tmp_path / "alexnet.pth")},
            "proposals": {"method": "selective_search"},
            "roi_head": roi_head,
        },
    )
    model = build_model(cfg, num_classes=3)
    fc = model.roi_head.box_head
    assert torch.equal(fc.fc6.weight, tv.classifier[1].weight) and torch.equal(fc.fc7.bias, tv.classifier[4].bias)
    # the conv layers are ImageNet's too: in the head for R-CNN, in the backbone for SPP-net
    body = model.roi_head.body if head == "rcnn" else model.backbone.body
    assert torch.equal(body.conv1[0].weight, tv.features[0].weight)


def test_bad_options_are_one_line_errors(tmp_path):
    cfg = from_dict(
        ModelConfig,
        {"backbone": {"name": "alexnet", "fpn": False, "norm": "bn", "pretrained": "IMAGENET1K_V1"}},
    )
    with pytest.raises(ConfigError, match="model.backbone.pretrained: AlexNet's ImageNet weights have no normal"):
        build_model(cfg, 3)
    cfg = from_dict(ModelConfig, {"backbone": {"name": "alexnet", "fpn": True}})
    with pytest.raises(ConfigError, match="model.backbone.fpn: alexnet gives one map"):
        build_model(cfg, 3)
    with pytest.raises(ValueError, match="norm: frozen_bn is not available for alexnet"):
        BackboneConfig(name="alexnet", norm="frozen_bn")
    with pytest.raises(BackboneError, match="norm must be none, bn or gn"):
        AlexNetBody(norm="frozen_bn")
    with pytest.raises(BackboneError, match=r"frozen_stages must be in 0\.\.5"):
        AlexNetBody(frozen_stages=6)

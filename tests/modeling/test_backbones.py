"""Tests of detkit.modeling.backbones: output names, strides, channels and feature sizes
(tiny, ResNet-18 FPN and C4, VGG-16 C4) on a 64 x 96 input, frozen stages, bad options, and
pretrained weights from a local file or (offline) a torchvision weight name."""

from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import SyncableBatchNorm2d, load_pretrained, norm_layer
from detkit.modeling.backbones.fpn import FPN
from detkit.modeling.backbones.resnet import ResNetBody, SingleMap, stage_out_channels, torchvision_resnet
from detkit.modeling.backbones.tiny import TinyResNet, TinyResNetBody
from detkit.modeling.backbones.vgg import VGGBody, torchvision_vgg16, vgg16_fc_state

X = torch.randn(1, 3, 64, 96)
# 64 x 96 at strides 4, 8, 16, 32, 64: 16x24, 8x12, 4x6, 2x3 and P6 = maxpool(2x3, s2) = 1x2
FPN_SHAPES = {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}
FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _check(backbone, shapes, channels):
    backbone.eval()
    with torch.no_grad():
        out = backbone(X)
    assert list(out) == backbone.out_features == list(shapes)
    for name, hw in shapes.items():
        assert tuple(out[name].shape) == (1, channels, *hw), name
    assert backbone.out_channels == channels


def test_tiny_body_and_fpn():
    body = TinyResNetBody()
    assert body.out_features == ["c2", "c3", "c4", "c5"]
    assert body.out_strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    assert body.out_channels_per_feature == {"c2": 16, "c3": 32, "c4": 64, "c5": 128}
    with torch.no_grad():
        out = body.eval()(X)
    assert [tuple(t.shape) for t in out.values()] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
    fpn = FPN(TinyResNetBody(), out_channels=32)
    assert fpn.out_strides == FPN_STRIDES and fpn.size_divisibility == 32
    _check(fpn, FPN_SHAPES, 32)


def test_tiny_single_map_c4():
    backbone = SingleMap(TinyResNetBody(out_features=("c4",)), size_divisibility=16)
    assert backbone.out_strides == {"c4": 16} and backbone.size_divisibility == 16
    assert backbone.body.stage_names == ["layer1", "layer2", "layer3"]  # no unused layer4
    _check(backbone, {"c4": (4, 6)}, 64)


def test_fpn_without_top_block():
    fpn = FPN(TinyResNetBody(), out_channels=8, top_block=False)
    assert fpn.out_features == ["p2", "p3", "p4", "p5"]
    _check(fpn, {k: v for k, v in FPN_SHAPES.items() if k != "p6"}, 8)


def test_resnet18_fpn_and_c4():
    fpn = FPN(ResNetBody(torchvision_resnet("resnet18")), out_channels=16)
    assert fpn.body.out_channels_per_feature == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    assert fpn.out_strides == FPN_STRIDES
    _check(fpn, FPN_SHAPES, 16)
    c4 = SingleMap(ResNetBody(torchvision_resnet("resnet18"), out_features=("c4",)))
    assert c4.out_strides == {"c4": 16} and not hasattr(c4.body, "layer4")
    _check(c4, {"c4": (4, 6)}, 256)


@pytest.mark.parametrize("depth", ["resnet50", "resnet101"])
def test_resnet_bottleneck_c4_construction(depth):
    c4 = SingleMap(ResNetBody(torchvision_resnet(depth, norm="frozen_bn"), out_features=("c4",)))
    assert c4.out_channels == 1024 and c4.out_strides == {"c4": 16}
    assert len(c4.body.layer3) == (6 if depth == "resnet50" else 23)
    assert isinstance(c4.body.bn1, torchvision.ops.FrozenBatchNorm2d)


def test_vgg16_c4():
    body = VGGBody(out_features=("c4",))
    assert not hasattr(body, "classifier")  # the fc layers are the builder's to hand over
    backbone = SingleMap(body)
    assert backbone.out_strides == {"c4": 16}
    _check(backbone, {"c4": (4, 6)}, 512)  # conv5_3 without the last max-pool: 64/16 x 96/16


def test_vgg16_fc_state_is_the_classifiers_fc6_fc7():
    net = torchvision_vgg16()
    state = vgg16_fc_state(net)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "fc6.weight": (4096, 25088),  # 7 x 7 x 512 pool5 inputs
        "fc6.bias": (4096,),
        "fc7.weight": (4096, 4096),
        "fc7.bias": (4096,),
    }
    assert torch.equal(state["fc7.weight"], net.classifier[3].weight)


def test_stage_out_channels():
    assert stage_out_channels(torchvision_resnet("resnet18").layer4) == 512  # BasicBlock: conv2
    assert stage_out_channels(torchvision_resnet("resnet50").layer3) == 1024  # Bottleneck: conv3
    assert stage_out_channels(TinyResNet(widths=(8, 16, 24, 40)).layer4) == 40
    with pytest.raises(BackboneError, match="not a stage of residual blocks"):
        stage_out_channels(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_vgg16_all_outputs_strides():
    body = VGGBody(out_features=("c2", "c3", "c4", "c5")).eval()
    with torch.no_grad():
        out = body(X)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "c2": (256, 16, 24),
        "c3": (512, 8, 12),
        "c4": (512, 4, 6),
        "c5": (512, 2, 3),
    }
    assert body.out_strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def _trainable(module):
    return {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}


def test_resnet_frozen_stages():
    # frozen_stages k freezes the stem and layer1..layer(k-1)
    assert _trainable(ResNetBody(torchvision_resnet("resnet18"), frozen_stages=0)) == {
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    }
    assert _trainable(ResNetBody(torchvision_resnet("resnet18"), frozen_stages=1)) == {
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    }
    body = ResNetBody(torchvision_resnet("resnet18"), frozen_stages=2)
    assert _trainable(body) == {"layer2", "layer3", "layer4"}
    body.train()  # freeze marks the BN layers; Detector.train keeps them in eval
    assert getattr(body.layer1[0].bn1, "_detkit_frozen", False)
    assert not getattr(body.layer2[0].bn1, "_detkit_frozen", False)
    assert _trainable(ResNetBody(torchvision_resnet("resnet18"), out_features=("c4",), frozen_stages=4)) == set()
    with pytest.raises(BackboneError, match=r"frozen_stages=5 is outside 0..4 \(the stem and 3 stages\)"):
        ResNetBody(torchvision_resnet("resnet18"), out_features=("c4",), frozen_stages=5)
    with pytest.raises(BackboneError, match=r"frozen_stages=-1 is outside 0..5"):
        ResNetBody(torchvision_resnet("resnet18"), frozen_stages=-1)


def test_vgg_and_tiny_frozen_stages():
    assert _trainable(VGGBody(out_features=("c4",), frozen_stages=2)) == {"block3", "block4", "block5"}
    assert _trainable(TinyResNetBody(frozen_stages=1)) == {"layer1", "layer2", "layer3", "layer4"}
    assert _trainable(TinyResNetBody(frozen_stages=3)) == {"layer3", "layer4"}
    assert _trainable(TinyResNetBody(out_features=("c4",), frozen_stages=4)) == set()
    with pytest.raises(BackboneError, match=r"frozen_stages=5 is outside 0..4"):
        TinyResNetBody(out_features=("c4",), frozen_stages=5)
    with pytest.raises(BackboneError, match="0..5"):
        VGGBody(out_features=("c4",), frozen_stages=6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ResNetBody(torchvision_resnet("resnet99")), "unknown ResNet 'resnet99'"),
        (lambda: ResNetBody(torchvision_resnet("resnet18"), out_features=("c6",)), "among"),
        (lambda: ResNetBody(torchvision_resnet("resnet18"), out_features=()), "among"),
        (lambda: ResNetBody(torchvision_resnet("resnet18", norm="none")), "normalisation"),
        (lambda: ResNetBody(torchvision_resnet("resnet18", norm="layernorm")), "unknown norm 'layernorm'"),
        (lambda: torchvision_vgg16("gn"), "'gn'"),
        (lambda: VGGBody(out_features=("p4",)), "among"),
        (lambda: TinyResNet(widths=(8, 16, 32)), "4 widths"),
        (lambda: TinyResNetBody(out_features=("c1",)), "among"),
        (lambda: TinyResNet(norm="none"), "normalisation"),
        (lambda: TinyResNetBody(TinyResNet(num_stages=3)), "output c5 needs stage layer4, the net has 3"),
        (lambda: load_pretrained(nn.Linear(1, 1), "/nonexistent/weights.pth"), "not found"),
    ],
)
def test_bad_options_raise_backbone_error(make, match):
    with pytest.raises(BackboneError, match=match):
        make()


def test_norm_layers():
    assert norm_layer("bn") is nn.BatchNorm2d and norm_layer("none") is None
    # syncbn: BatchNorm with the same state dict (checkpoints move between bn and syncbn);
    # a distributed run's trainer synchronises it (tests/engine/test_distributed.py)
    assert norm_layer("syncbn") is SyncableBatchNorm2d and issubclass(SyncableBatchNorm2d, nn.BatchNorm2d)
    assert TinyResNet(norm="syncbn").state_dict().keys() == TinyResNet(norm="bn").state_dict().keys()
    assert isinstance(norm_layer("frozen_bn")(8), torchvision.ops.FrozenBatchNorm2d)
    assert norm_layer("gn")(16).num_groups == 4 and norm_layer("gn")(256).num_groups == 32


def test_pretrained_from_local_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality means it was loaded
    body = ResNetBody(torchvision_resnet("resnet18", pretrained=str(path)), out_features=("c4",))
    torch.testing.assert_close(body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, reference.bn1.running_var)
    # a checkpoint wrapping the state dict under "model" loads too, with frozen BN
    torch.save({"model": reference.state_dict()}, tmp_path / "ckpt.pth")
    body = ResNetBody(
        torchvision_resnet("resnet18", norm="frozen_bn", pretrained=str(tmp_path / "ckpt.pth")), out_features=("c4",)
    )
    torch.testing.assert_close(body.bn1.weight, reference.bn1.weight)


def test_pretrained_file_that_does_not_fit(tmp_path):
    # ResNet-18 weights into a ResNet-50: same key names (mostly), other shapes.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BackboneError, match="r18.pth") as info:
        ResNetBody(torchvision_resnet("resnet50", pretrained=str(tmp_path / "r18.pth")))
    assert "\n" not in str(info.value)


def test_pretrained_file_lacking_keys(tmp_path):
    state = {
        k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("layer4")
    }
    torch.save(state, tmp_path / "partial.pth")
    # layer4 = block 0 (3 convs + 3 BNs x weight, bias, running mean/var) + block 1 (2 + 2 x 4)
    # = 15 + 10 = 25 keys (num_batches_tracked may be absent from any checkpoint)
    with pytest.raises(BackboneError, match="partial.pth lack 25 keys"):
        ResNetBody(torchvision_resnet("resnet18", pretrained=str(tmp_path / "partial.pth")))


def test_weight_name_offline_gives_one_line_error(monkeypatch):
    def offline(self, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(BackboneError) as info:
        ResNetBody(torchvision_resnet("resnet18", pretrained="ResNet18_Weights.IMAGENET1K_V1"))
    message = str(info.value)
    assert "\n" not in message
    assert "cannot download ResNet18_Weights.IMAGENET1K_V1 (URLError: <urlopen error no network>)" in message
    assert "local file" in message
    # the short form (member name only) resolves the same enum
    with pytest.raises(BackboneError, match="cannot download ResNet18_Weights.IMAGENET1K_V1"):
        ResNetBody(torchvision_resnet("resnet18", pretrained="IMAGENET1K_V1"))


def test_unknown_weight_name():
    with pytest.raises(BackboneError, match="neither a file nor a ResNet18_Weights name") as info:
        ResNetBody(torchvision_resnet("resnet18", pretrained="ResNet18_Weights.IMAGENET9K"))
    assert "IMAGENET1K_V1" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("channels, groups", [(16, 4), (18, 3), (144, 24), (256, 32), (2, 1)])
def test_group_norm_groups_divide_the_channels(channels, groups):
    assert norm_layer("gn")(channels).num_groups == groups


def test_frozen_batchnorm_stays_frozen_when_the_body_trains_alone():
    body = ResNetBody(torchvision_resnet("resnet18", norm="bn"), out_features=("c4",), frozen_stages=2).train()
    assert not body.bn1.training and not body.layer1[0].bn1.training  # frozen: eval mode
    assert body.layer2[0].bn1.training  # trainable stages train
    before = body.bn1.running_mean.clone()
    body(torch.randn(2, 3, 64, 64))
    assert torch.equal(body.bn1.running_mean, before)

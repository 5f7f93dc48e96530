"""AlexNet backbone: torchvision's definition layer by layer (same numbers as torchvision's
AlexNet for the same weights), conv5 at stride 16, pool5 = 9216 features, BN/GN variants for
training from scratch, pretrained weights from a local file with the fc6/fc7 hand-over."""

import pytest
import torch
import torchvision

from detkit.errors import BackboneError
from detkit.modeling.backbones.alexnet import POOL5_FEATURES, AlexNetBody


def test_same_function_as_torchvision_alexnet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    body = AlexNetBody(norm="none", pretrained=str(tmp_path / "alexnet.pth")).eval()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        conv5 = body(x)["c4"]
        expected_conv5 = tv.features[:12](x)  # up to conv5 + ReLU
        torch.testing.assert_close(conv5, expected_conv5)
        pool5 = body.pool5(conv5)
        torch.testing.assert_close(pool5, torch.flatten(tv.avgpool(tv.features(x)), 1))
    assert pool5.shape == (2, POOL5_FEATURES) and conv5.shape == (2, 256, 13, 13)  # 227 px -> 13 x 13
    # fc6 / fc7 kept for the head
    assert torch.equal(body.fc_state["fc6.weight"], tv.classifier[1].weight)
    assert torch.equal(body.fc_state["fc7.bias"], tv.classifier[4].bias)


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
    assert AlexNetBody().fc_state is None  # no pretrained weights: nothing to hand over


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(BackboneError, match="no normalisation layers: use norm none"):
        AlexNetBody(norm="bn", pretrained="IMAGENET1K_V1")
    with pytest.raises(BackboneError, match="norm must be none, bn or gn"):
        AlexNetBody(norm="frozen_bn")
    with pytest.raises(BackboneError, match=r"frozen_stages must be in 0\.\.5"):
        AlexNetBody(frozen_stages=6)

"""AlexNet (Krizhevsky et al., NIPS 2012) from ``torchvision.models.alexnet``: the network of
R-CNN (warped crops through the whole network, fc7 features) and, as conv5, of SPP-net's and
Fast R-CNN's small models (Fast R-CNN's "S" = CaffeNet, its AlexNet variant).

Single map: conv5 after ReLU, before the last max-pool: stride 16, 256 channels (three
stride-2 steps: conv1 stride 4, two 3x3/2 max-pools). ``pool5`` applies that last max-pool
and the 6x6 adaptive average pool of torchvision's definition: (N, 256, 6, 6) = 9216
features for fc6, whatever the crop size (R-CNN's 227 px gives 6x6 directly).

norm "none" is the original AlexNet (ImageNet weights from a local file or a torchvision
weight name, ``torchvision_alexnet``); "bn" / "gn" put a normalisation layer after every
convolution, which lets it train from scratch (the ImageNet weights do not fit those layers).
frozen_stages k freezes conv1..convk (R-CNN fine-tuned everything; SPP-net fine-tuned only
the fc layers: 5; Fast R-CNN's S model fine-tunes from conv2).

The ImageNet fc6 / fc7 are not part of the body: ``alexnet_fc_state`` takes them out of the
torchvision network, and the model builder hands them to the region head whose fc layers
have their shape (``modeling.build.HandOver``), as it does with VGG-16's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import AlexNet

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, load_pretrained, norm_layer

# output channels of conv1..conv5 in torchvision's AlexNet (kernels 11/4, 5, 3, 3, 3)
_CHANNELS = [64, 192, 384, 256, 256]
# indices of the convolutions inside torchvision's ``features`` Sequential
_TV_CONV_INDEX = [0, 3, 6, 8, 10]

POOL5_FEATURES = 256 * 6 * 6


def torchvision_alexnet(pretrained: Optional[str] = None) -> AlexNet:
    """torchvision's AlexNet classifier, with ImageNet weights when ``pretrained`` names them
    (a local state-dict file or a torchvision weight name such as ``AlexNet_Weights.IMAGENET1K_V1``).
    ``AlexNetBody`` takes its convolutions; ``alexnet_fc_state`` its fc6 / fc7."""
    net = torchvision.models.alexnet(weights=None)
    if pretrained:
        load_pretrained(net, pretrained, torchvision.models.AlexNet_Weights)
    return net


def alexnet_fc_state(net: AlexNet) -> Dict[str, Tensor]:
    """AlexNet's fc6 / fc7 (classifier[1] and [4]) under ``MLPBoxHead``'s names, for a region
    head that continues the network (R-CNN's crop network; SPP-net's fc layers)."""
    fc6, fc7 = net.classifier[1], net.classifier[4]
    assert isinstance(fc6, nn.Linear) and isinstance(fc7, nn.Linear)
    return {
        "fc6.weight": fc6.weight.detach().clone(),
        "fc6.bias": fc6.bias.detach().clone(),
        "fc7.weight": fc7.weight.detach().clone(),
        "fc7.bias": fc7.bias.detach().clone(),
    }


class AlexNetBody(Body):
    """(N, 3, H, W) -> {"c4": conv5 (N, 256, ~H/16, ~W/16)}; ``pool5(c4)`` -> (N, 9216).

    net: the torchvision AlexNet to take the convolutions from (``torchvision_alexnet``; None:
        a randomly initialised one). With norm bn / gn a normalisation layer follows every
        convolution and the convolutions are re-initialised (He init) for training from
        scratch, so ``net`` must not carry ImageNet weights then.
    """

    def __init__(self, net: Optional[AlexNet] = None, norm: str = "none", frozen_stages: int = 0):
        super().__init__()
        if norm not in ("none", "bn", "gn"):
            raise BackboneError(f"AlexNet norm must be none, bn or gn, got '{norm}'")
        if not 0 <= frozen_stages <= 5:
            raise BackboneError(f"AlexNet frozen_stages must be in 0..5, got {frozen_stages}")
        layer = norm_layer(norm) if norm != "none" else None
        tv = net if net is not None else torchvision.models.alexnet(weights=None)
        self.stage_names: List[str] = []
        for i, cout in enumerate(_CHANNELS):
            conv = tv.features[_TV_CONV_INDEX[i]]
            assert isinstance(conv, nn.Conv2d) and conv.out_channels == cout
            parts: List[nn.Module] = [conv]
            if layer is not None:
                parts.append(layer(cout))
            parts.append(nn.ReLU(inplace=True))
            if i < 2:  # max-pools after conv1 and conv2
                parts.append(nn.MaxPool2d(3, 2))
            name = f"conv{i + 1}"
            self.add_module(name, nn.Sequential(*parts))
            self.stage_names.append(name)
        if layer is not None:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):  # He init for from-scratch training with BN/GN
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.pool = nn.MaxPool2d(3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.out_features = ["c4"]
        self.out_strides = {"c4": 16}
        self.out_channels_per_feature = {"c4": 256}
        freeze([getattr(self, f"conv{i + 1}") for i in range(frozen_stages)])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return OrderedDict(c4=x)

    def pool5(self, c4: Tensor) -> Tensor:
        """conv5 -> max-pool 3/2 -> 6x6 average pool -> (N, 9216), the input of fc6."""
        return torch.flatten(self.avgpool(self.pool(c4)), 1)

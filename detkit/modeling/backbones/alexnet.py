"""AlexNet (Krizhevsky et al., NIPS 2012) from ``torchvision.models.alexnet``: the network of
R-CNN (warped crops through the whole network, fc7 features) and, as conv5, of SPP-net's and
Fast R-CNN's small models (Fast R-CNN's "S" = CaffeNet, its AlexNet variant).

Single map: conv5 after ReLU, before the last max-pool: stride 16, 256 channels (three
stride-2 steps: conv1 stride 4, two 3x3/2 max-pools). ``pool5`` applies that last max-pool
and the 6x6 adaptive average pool of torchvision's definition: (N, 256, 6, 6) = 9216
features for fc6, whatever the crop size (R-CNN's 227 px gives 6x6 directly).

norm "none" is the original AlexNet (ImageNet weights from a local file or a torchvision
weight name); "bn" / "gn" put a normalisation layer after every convolution, which lets it
train from scratch (the ImageNet weights do not fit those layers). frozen_stages k freezes
conv1..convk (R-CNN fine-tuned everything; Fast R-CNN's S model fine-tunes from conv2).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torchvision
from torch import Tensor, nn

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, load_pretrained, norm_layer

# output channels of conv1..conv5 in torchvision's AlexNet (kernels 11/4, 5, 3, 3, 3)
_CHANNELS = [64, 192, 384, 256, 256]
# indices of the convolutions inside torchvision's ``features`` Sequential
_TV_CONV_INDEX = [0, 3, 6, 8, 10]


class AlexNetBody(Body):
    """(N, 3, H, W) -> {"c4": conv5 (N, 256, ~H/16, ~W/16)}; ``pool5(c4)`` -> (N, 9216).

    fc_state: the ImageNet fc6 / fc7 weights ({"fc6.weight", "fc6.bias", "fc7.weight",
    "fc7.bias"}) when pretrained weights were loaded, for the builder to hand to a head whose
    fc layers have their shape (R-CNN's crop network, Fast R-CNN with RoI pooling 6x6)."""

    def __init__(self, norm: str = "none", frozen_stages: int = 0, pretrained: Optional[str] = None):
        super().__init__()
        if norm not in ("none", "bn", "gn"):
            raise BackboneError(f"AlexNet norm must be none, bn or gn, got '{norm}'")
        if pretrained and norm != "none":
            raise BackboneError(
                f"AlexNet's ImageNet weights have no normalisation layers: use norm none with pretrained "
                f"weights, or norm {norm} from scratch"
            )
        if not 0 <= frozen_stages <= 5:
            raise BackboneError(f"AlexNet frozen_stages must be in 0..5, got {frozen_stages}")
        layer = norm_layer(norm) if norm != "none" else None
        self.fc_state: Optional[Dict[str, Tensor]] = None
        tv = torchvision.models.alexnet(weights=None)
        if pretrained:
            load_pretrained(tv, pretrained, torchvision.models.AlexNet_Weights)
            self.fc_state = {
                "fc6.weight": tv.classifier[1].weight.detach().clone(),
                "fc6.bias": tv.classifier[1].bias.detach().clone(),
                "fc7.weight": tv.classifier[4].weight.detach().clone(),
                "fc7.bias": tv.classifier[4].bias.detach().clone(),
            }
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


POOL5_FEATURES = 256 * 6 * 6

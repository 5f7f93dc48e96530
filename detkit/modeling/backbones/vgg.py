"""VGG-16 (Simonyan & Zisserman, ICLR 2015) from ``torchvision.models``, the backbone of
Fast R-CNN and of the Faster R-CNN paper's main results.

Single map: conv5_3 (after ReLU, last max-pool removed), stride 16, 512 channels
(Fast R-CNN sec. 2.3). Stage outputs for FPN: c2 = conv3_3 (stride 4), c3 = conv4_3 (8),
c4 = conv5_3 (16), c5 = pool5 (32).

norm "none" is the original VGG-16; "bn" uses torchvision's vgg16_bn (needed to train
from scratch). frozen_stages k freezes conv blocks 1..k (Fast R-CNN sec. 4.5 fine-tunes
from conv3_1 up: frozen_stages=2).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torchvision
from torch import Tensor, nn
from torchvision.models.vgg import VGG

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, load_pretrained

_OUTPUTS = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
_CHANNELS = {"c2": 256, "c3": 512, "c4": 512, "c5": 512}


def torchvision_vgg16(norm: str = "none", pretrained: Optional[str] = None) -> VGG:
    """torchvision's VGG-16 classifier ("bn": vgg16_bn), with ImageNet weights when
    ``pretrained`` names them. ``VGGBody`` takes its conv blocks; the model builder hands its
    fc6/fc7 (``vgg16_fc_state``) to the Fast R-CNN head."""
    if norm not in ("none", "bn"):
        raise BackboneError(f"VGG-16 norm must be 'none' or 'bn', got '{norm}'")
    if norm == "bn":
        net, weights = torchvision.models.vgg16_bn(weights=None), torchvision.models.VGG16_BN_Weights
    else:
        net, weights = torchvision.models.vgg16(weights=None), torchvision.models.VGG16_Weights
    if pretrained:
        load_pretrained(net, pretrained, weights)
    return net


def vgg16_fc_state(net: VGG) -> Dict[str, Tensor]:
    """VGG-16's fc6/fc7 (classifier[0] and [3]) under ``MLPBoxHead``'s names, for the Fast
    R-CNN head (Fast R-CNN sec. 2.2: the network's fc layers become the RoI head)."""
    fc6, fc7 = net.classifier[0], net.classifier[3]
    assert isinstance(fc6, nn.Linear) and isinstance(fc7, nn.Linear)
    return {
        "fc6.weight": fc6.weight.detach(),
        "fc6.bias": fc6.bias.detach(),
        "fc7.weight": fc7.weight.detach(),
        "fc7.bias": fc7.bias.detach(),
    }


class VGGBody(Body):
    """(N, 3, H, W) -> OrderedDict of the requested outputs among c2..c5 (see module doc).

    net: the torchvision VGG-16 to take the conv blocks from (``torchvision_vgg16``; None: a
        randomly initialised one without BatchNorm).
    frozen_stages: k freezes conv blocks 1..k (0..5).
    """

    def __init__(self, net: Optional[VGG] = None, out_features: Sequence[str] = ("c4",), frozen_stages: int = 0):
        super().__init__()
        net = net if net is not None else torchvision_vgg16()
        unknown = [f for f in out_features if f not in _OUTPUTS]
        if unknown or not out_features:
            raise BackboneError(f"VGG-16 outputs must be among {list(_OUTPUTS)}, got {list(out_features)}")
        # Split the flat torchvision Sequential into the five conv blocks at its max-pools.
        blocks: List[nn.Sequential] = []
        current: List[nn.Module] = []
        for layer in net.features.children():
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(nn.Sequential(*current))
                current = []
            else:
                current.append(layer)
        self.block1, self.block2, self.block3, self.block4, self.block5 = blocks
        self.pool = nn.MaxPool2d(2, 2)
        self.out_features = [f for f in _OUTPUTS if f in out_features]
        self.out_strides = {f: _OUTPUTS[f] for f in self.out_features}
        self.out_channels_per_feature = {f: _CHANNELS[f] for f in self.out_features}
        if not 0 <= frozen_stages <= 5:
            raise BackboneError(f"VGG-16 frozen_stages must be in 0..5, got {frozen_stages}")
        freeze([getattr(self, f"block{i + 1}") for i in range(frozen_stages)])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out = OrderedDict()
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.block3(x)
        if "c2" in self.out_features:
            out["c2"] = x
        x = self.block4(self.pool(x))
        if "c3" in self.out_features:
            out["c3"] = x
        if self.out_features[-1] == "c3":
            return out
        x = self.block5(self.pool(x))
        if "c4" in self.out_features:
            out["c4"] = x
        if "c5" in self.out_features:
            out["c5"] = self.pool(x)
        return out

"""ResNet trunks (He et al., CVPR 2016) from ``torchvision.models`` definitions.

The body exposes stage outputs C2..C5 (strides 4, 8, 16, 32; channels 64..512 for
ResNet-18/34, 256..2048 for ResNet-50/101). Single-map use ("C4", the ResNet paper's
Faster R-CNN) stops after conv4_x and returns ``c4`` at stride 16; FPN use feeds C2..C5
to ``detkit.modeling.backbones.fpn.FPN``.

Module names follow torchvision (conv1, bn1, layer1..layer4), so ImageNet weights and
torchvision detection checkpoints load by name.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, load_pretrained, norm_layer

_RESNETS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
}
_STAGES = ["c2", "c3", "c4", "c5"]
_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def torchvision_resnet(depth: str = "resnet50", norm: str = "bn", pretrained: Optional[str] = None) -> ResNet:
    """torchvision's ResNet classifier with detkit's normalisation layer, and ImageNet weights
    when ``pretrained`` names them (a local state-dict file or a torchvision weight name).

    ``ResNetBody`` takes its stem and stages up to the last output; the model builder hands
    ``layer4`` of the same network to a Res5 head (``heads.res5``), so both use one set of
    weights. norm: bn | frozen_bn | gn (see ``common.norm_layer``)."""
    if depth not in _RESNETS:
        raise BackboneError(f"unknown ResNet '{depth}' (use {', '.join(_RESNETS)})")
    builder, weights_name = _RESNETS[depth]
    layer = norm_layer(norm)
    if layer is None:
        raise BackboneError("ResNet needs a normalisation layer (bn, frozen_bn or gn)")
    net = builder(weights=None, norm_layer=layer)
    if pretrained:
        load_pretrained(net, pretrained, getattr(torchvision.models, weights_name))
    return net


class ResNetBody(Body):
    """(N, 3, H, W) -> OrderedDict of the requested stage outputs among c2..c5.

    net: the torchvision ResNet to take the stem and stages from (``torchvision_resnet``);
        stages after the last requested output are not taken (a C4 body has no layer4).
    frozen_stages: 0 trains everything; 1 freezes the stem (conv1); k freezes the stem and
        layer1..layer(k-1) (torchvision's trainable_layers=3 is frozen_stages=2); at most the
        number of taken stages + 1.
    """

    def __init__(self, net: ResNet, out_features: Sequence[str] = ("c2", "c3", "c4", "c5"), frozen_stages: int = 0):
        super().__init__()
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown or not out_features:
            raise BackboneError(f"ResNet outputs must be among {_STAGES}, got {list(out_features)}")
        self.out_features = [f for f in _STAGES if f in out_features]
        last = _STAGES.index(self.out_features[-1])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.stage_names = [f"layer{i + 1}" for i in range(last + 1)]
        self.out_channels_per_feature: Dict[str, int] = {}
        for i, name in enumerate(self.stage_names):
            stage = getattr(net, name)
            self.add_module(name, stage)
            self.out_channels_per_feature[_STAGES[i]] = stage_out_channels(stage)
        self.out_strides = {f: _STRIDES[f] for f in self.out_features}
        if not 0 <= frozen_stages <= len(self.stage_names) + 1:
            raise BackboneError(
                f"frozen_stages={frozen_stages} is outside 0..{len(self.stage_names) + 1} "
                f"(the stem and {len(self.stage_names)} stages)"
            )
        if frozen_stages >= 1:
            freeze([self.conv1, self.bn1])
        for name in self.stage_names[: max(frozen_stages - 1, 0)]:
            freeze([getattr(self, name)])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if _STAGES[i] in self.out_features:
                out[_STAGES[i]] = x
        return out


def stage_out_channels(stage: nn.Module) -> int:
    """Output channels of a stage of torchvision residual blocks (BasicBlock or Bottleneck)."""
    block = list(stage.children())[-1]
    if isinstance(block, Bottleneck):
        return int(block.conv3.out_channels)
    if isinstance(block, BasicBlock):
        return int(block.conv2.out_channels)
    raise BackboneError(f"not a stage of residual blocks: {type(block).__name__}")


class SingleMap(nn.Module):
    """Wraps a body with one output as a backbone (an ``interfaces.Backbone``: ResNet C4,
    VGG conv5_3). size_divisibility: inputs are padded to a multiple of it (the map's stride
    keeps every pixel of the map aligned to the same input pixels in every image)."""

    def __init__(self, body: Body, size_divisibility: int = 16):
        super().__init__()
        self.body = body
        if len(body.out_features) != 1:
            raise BackboneError(f"SingleMap needs a body with one output, got {body.out_features}")
        name = body.out_features[0]
        self.out_features: List[str] = [name]
        self.out_channels: int = body.out_channels_per_feature[name]
        self.out_strides: Dict[str, int] = dict(body.out_strides)
        self.size_divisibility = int(size_divisibility)

    def forward(self, x: Tensor):
        return self.body(x)

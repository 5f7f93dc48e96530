"""A narrow ResNet for tests, the quick start and CPU-only experiments.

``TinyResNet`` is the whole network: a 3x3 stride-2 stem and up to four stages
(layer1..layer4) of torchvision ``BasicBlock``s, each stage halving the resolution, giving
c2..c5 at strides 4..32. With widths (16, 32, 64, 128) it has ~0.7 M parameters and runs a
160 px image in a few milliseconds on one CPU core, yet trains from scratch (BatchNorm).
``TinyResNetBody`` takes its stem and the stages up to the last requested output; a Res5
head takes its layer4 (the model builder hands it over, as for torchvision's ResNets).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, norm_layer

_STAGES = ["c2", "c3", "c4", "c5"]


class TinyResNet(nn.Module):
    """stem + layer1..layer{num_stages}, no classifier. widths: channels of c2..c5 (4 values);
    blocks: basic blocks per stage; norm: bn | gn | frozen_bn; num_stages: how many of the
    four stages to build (3 for a C4 body that no head continues, 4 otherwise)."""

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential  # only with num_stages = 4

    def __init__(
        self, widths: Sequence[int] = (16, 32, 64, 128), blocks: int = 1, norm: str = "bn", num_stages: int = 4
    ):
        super().__init__()
        if len(widths) != 4:
            raise BackboneError(f"tiny backbone needs 4 widths (c2..c5), got {list(widths)}")
        if not 1 <= num_stages <= 4:
            raise BackboneError(f"tiny backbone has 1..4 stages, got {num_stages}")
        layer = norm_layer(norm)
        if layer is None:
            raise BackboneError("tiny backbone needs a normalisation layer")
        self.widths = [int(w) for w in widths]
        stem = self.widths[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), layer(stem), nn.ReLU(inplace=True)
        )
        in_ch = stem
        self.stage_names: List[str] = []
        for i, width in enumerate(self.widths[:num_stages]):
            down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=2, bias=False), layer(width))
            stage = [BasicBlock(in_ch, width, stride=2, downsample=down, norm_layer=layer)]
            stage += [BasicBlock(width, width, norm_layer=layer) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.stage_names.append(f"layer{i + 1}")
            in_ch = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class TinyResNetBody(Body):
    """(N, 3, H, W) -> OrderedDict of the requested outputs among c2..c5.

    net: the ``TinyResNet`` to take the stem and stages from (None: a default one);
    frozen_stages: 0 trains everything; 1 freezes the stem; k freezes the stem and
        layer1..layer(k-1); at most the number of taken stages + 1.
    """

    def __init__(
        self,
        net: Optional[TinyResNet] = None,
        out_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        frozen_stages: int = 0,
    ):
        super().__init__()
        net = net if net is not None else TinyResNet()
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown or not out_features:
            raise BackboneError(f"tiny backbone outputs must be among {_STAGES}, got {list(out_features)}")
        self.out_features = [f for f in _STAGES if f in out_features]
        last = _STAGES.index(self.out_features[-1])
        if last >= len(net.stage_names):
            raise BackboneError(
                f"output {self.out_features[-1]} needs stage layer{last + 1}, the net has {len(net.stage_names)}"
            )
        self.stem = net.stem
        self.stage_names = net.stage_names[: last + 1]
        for name in self.stage_names:
            self.add_module(name, getattr(net, name))
        self.out_channels_per_feature = {_STAGES[i]: net.widths[i] for i in range(last + 1)}
        self.out_strides = {f: 4 * 2 ** _STAGES.index(f) for f in self.out_features}
        if not 0 <= frozen_stages <= len(self.stage_names) + 1:
            raise BackboneError(
                f"frozen_stages={frozen_stages} is outside 0..{len(self.stage_names) + 1} "
                f"(the stem and {len(self.stage_names)} stages)"
            )
        if frozen_stages >= 1:
            freeze([self.stem])
        for name in self.stage_names[: max(frozen_stages - 1, 0)]:
            freeze([getattr(self, name)])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.stem(x)
        out = OrderedDict()
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if _STAGES[i] in self.out_features:
                out[_STAGES[i]] = x
        return out

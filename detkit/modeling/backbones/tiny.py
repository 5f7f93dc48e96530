"""A narrow ResNet for tests, the quick start and CPU-only experiments.

Built from torchvision's ``BasicBlock`` with configurable widths: a 3x3 stride-2 stem and
four stages of ``blocks`` basic blocks, each stage halving the resolution, giving
c2..c5 at strides 4..32. With widths (16, 32, 64, 128) it has ~0.7 M parameters and runs a
160 px image in a few milliseconds on one CPU core, yet trains from scratch (BatchNorm).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from detkit.errors import BackboneError
from detkit.modeling.backbones.common import Body, freeze, norm_layer

_STAGES = ["c2", "c3", "c4", "c5"]


class TinyResNetBody(Body):
    """widths: channels of c2..c5; blocks: basic blocks per stage; norm: bn | gn | frozen_bn."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: int = 1,
        out_features=("c2", "c3", "c4", "c5"),
        norm: str = "bn",
        frozen_stages: int = 0,
    ):
        super().__init__()
        if len(widths) != 4:
            raise BackboneError(f"tiny backbone needs 4 widths (c2..c5), got {list(widths)}")
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown or not out_features:
            raise BackboneError(f"tiny backbone outputs must be among {_STAGES}, got {list(out_features)}")
        layer = norm_layer(norm)
        if layer is None:
            raise BackboneError("tiny backbone needs a normalisation layer")
        stem = widths[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), layer(stem), nn.ReLU(inplace=True)
        )
        self.out_features = [f for f in _STAGES if f in out_features]
        last = _STAGES.index(self.out_features[-1])
        in_ch = stem
        self.stage_names = []
        for i, width in enumerate(widths[: last + 1]):
            down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=2, bias=False), layer(width))
            stage = [BasicBlock(in_ch, width, stride=2, downsample=down, norm_layer=layer)]
            stage += [BasicBlock(width, width, norm_layer=layer) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.stage_names.append(f"layer{i + 1}")
            in_ch = width
        self.out_channels_per_feature = {_STAGES[i]: widths[i] for i in range(last + 1)}
        self.out_strides = {f: 4 * 2 ** _STAGES.index(f) for f in self.out_features}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
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

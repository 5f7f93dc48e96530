"""Feature Pyramid Network (Lin et al., CVPR 2017) over any body with C2..C5 outputs.

Outputs P2..P5 (strides 4..32) from torchvision.ops.FeaturePyramidNetwork (1x1 lateral
convs, nearest 2x top-down upsampling, 3x3 output convs) plus P6 = max-pool(P5, stride 2),
used only by the RPN for the largest anchors (FPN paper sec. 4.1). Every output has
``out_channels`` channels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detkit.modeling.backbones.common import Body, norm_layer


class FPN(nn.Module):
    """An ``interfaces.Backbone`` over a body (``common.Body``) returning consecutive stages
    (e.g. c2..c5). norm: None/"none" (the paper), or a normalisation for the FPN convs (e.g.
    "gn" when training from scratch)."""

    def __init__(self, body: Body, out_channels: int = 256, norm: Optional[str] = None, top_block: bool = True):
        super().__init__()
        self.body = body
        in_names = list(body.out_features)
        in_channels = [body.out_channels_per_feature[n] for n in in_names]
        self.fpn = FeaturePyramidNetwork(
            in_channels,
            out_channels,
            extra_blocks=LastLevelMaxPool() if top_block else None,
            norm_layer=norm_layer(norm) if norm and norm != "none" else None,
        )
        self.in_names = in_names
        strides = [body.out_strides[n] for n in in_names]
        self.out_features: List[str] = [f"p{n[1:]}" for n in in_names]
        self.out_strides: Dict[str, int] = {p: s for p, s in zip(self.out_features, strides)}
        if top_block:
            last = int(in_names[-1][1:]) + 1
            self.out_features.append(f"p{last}")
            self.out_strides[f"p{last}"] = strides[-1] * 2
        self.out_channels = int(out_channels)
        # Every body level must halve exactly (the top-down path adds upsampled maps to
        # laterals), so inputs are padded to the coarsest body stride.
        self.size_divisibility = strides[-1]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        outs = self.fpn(OrderedDict((n, feats[n]) for n in self.in_names))
        return OrderedDict(zip(self.out_features, outs.values()))

"""The image itself as the "feature map": the backbone of R-CNN, whose CNN runs on each warped
region (inside the region head), not on the whole image.

(N, 3, H, W) -> {"image": the same tensor}: stride 1, 3 channels, no padding constraint.
The Detector stays one machine (backbone -> proposals -> region head) for every pipeline;
for R-CNN this first part is simply the identity.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class ImageInput(nn.Module):
    """Identity backbone: out_features ["image"], out_channels 3, stride 1."""

    def __init__(self) -> None:
        super().__init__()
        self.out_features = ["image"]
        self.out_channels = 3
        self.out_strides = {"image": 1}
        self.size_divisibility = 1

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict(image=x)

"""Anchors (Faster R-CNN sec. 3.1.1): at every feature-map location, A = |sizes| x |ratios|
reference boxes centred on the location.

Shapes: L feature levels; level l has H_l x W_l locations and stride s_l; A anchors per
location. Anchors of one level are ordered (y, x, a): location-major, anchor-minor, which
is also the order of the RPN head's outputs after ``permute(0, 2, 3, 1)``.

Conventions (the same as torchvision's AnchorGenerator, so weights trained there transfer):
- ``aspect_ratio`` is height / width; an anchor of size s and ratio r has
  w = s / sqrt(r), h = s * sqrt(r) (area s^2);
- the cell anchors (centred at 0) are rounded to whole pixels;
- location (y, x) is at pixel (x * s_l + offset * s_l, y * s_l + offset * s_l); offset 0
  puts anchors at the top-left corner of their cell, 0.5 at its centre.
- ``strides_from_input=True`` reproduces torchvision exactly: the stride of a level is
  (padded input size) // (feature size) per axis. That equals the true stride except on a
  level with an odd-sized parent (FPN's P6 from an odd P5: 800 // 13 = 61, not 64), and
  converted torchvision weights only reproduce torchvision's boxes with the same anchors.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(A, 4) anchors centred at (0, 0), ratio-major: [r0 s0, r0 s1, ..., r1 s0, ...]."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """sizes[l], aspect_ratios[l]: the anchor sizes and ratios of level l (one entry per
    feature level; a single entry is repeated for every level). ``strides`` are the feature
    strides in input pixels (from the backbone).

    Faster R-CNN paper (VGG, one level): sizes [[128, 256, 512]], ratios [[0.5, 1, 2]], stride 16.
    FPN paper sec. 4.1: one size per level {32, 64, 128, 256, 512} on P2..P6, ratios {0.5, 1, 2}.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
        strides_from_input: bool = False,
    ):
        super().__init__()
        strides = list(strides)
        sizes = [list(s) for s in sizes]
        aspect_ratios = [list(r) for r in aspect_ratios]
        if len(sizes) == 1:
            sizes = sizes * len(strides)
        if len(aspect_ratios) == 1:
            aspect_ratios = aspect_ratios * len(strides)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(
                f"anchor sizes ({len(sizes)} levels), aspect ratios ({len(aspect_ratios)}) and feature "
                f"strides ({len(strides)}) disagree"
            )
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.strides = strides
        self.offset = float(offset)
        self.strides_from_input = bool(strides_from_input)
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        for i, (s, r) in enumerate(zip(sizes, aspect_ratios)):
            self.register_buffer(f"cell_anchors_{i}", cell_anchors(s, r), persistent=False)
        self._cache: Dict[Tuple, Tensor] = {}

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, level: int, height, width, stride_y, stride_x) -> Tensor:
        """(H * W * A, 4) anchors of one level in input pixels. Sizes and strides are ints,
        or 0-dim tensors while tracing for export (then nothing is cached: the exported graph
        computes the grid of each input size)."""
        base: Tensor = getattr(self, f"cell_anchors_{level}")
        tracing = torch.jit.is_tracing()
        key = (level, height, width, stride_y, stride_x, base.device)
        cached = None if tracing else self._cache.get(key)
        if cached is not None:
            return cached
        shifts_x = (torch.arange(width, device=base.device, dtype=torch.float32) + self.offset) * stride_x
        shifts_y = (torch.arange(height, device=base.device, dtype=torch.float32) + self.offset) * stride_y
        sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
        anchors = (shifts + base.to(torch.float32)[None]).reshape(-1, 4)
        if tracing:
            return anchors
        if len(self._cache) > 64:  # many input sizes (multi-scale training): keep it bounded
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, features: Sequence[Tensor], input_size: Tuple[int, int]) -> List[Tensor]:
        """One (H_l * W_l * A, 4) tensor per level; identical for every image of the batch.
        input_size: (H, W) of the padded input batch."""
        if len(features) != len(self.strides):
            raise ValueError(f"AnchorGenerator has {len(self.strides)} levels, got {len(features)} feature maps")
        out = []
        for i, f in enumerate(features):
            # While tracing (export) the sizes stay 0-dim tensors: int() would freeze the
            # traced input's grid into the graph.
            h, w = (f.shape[-2], f.shape[-1]) if torch.jit.is_tracing() else (int(f.shape[-2]), int(f.shape[-1]))
            if self.strides_from_input:
                sy, sx = input_size[0] // h, input_size[1] // w
            else:
                sy = sx = self.strides[i]
            out.append(self.grid_anchors(i, h, w, sy, sx))
        return out

    def extra_repr(self) -> str:
        return (
            f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
            f"offset={self.offset}, strides_from_input={self.strides_from_input}"
        )

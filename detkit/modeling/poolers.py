"""Poolers: how a region becomes a fixed-size feature, the part the lineage keeps swapping.

    RoIPooler(kind="roi_pool")   Fast R-CNN sec. 2.1: max-pool each RoI into S x S bins
    RoIPooler(kind="roi_align")  Mask R-CNN sec. 3: bilinear sampling, no quantisation

Both take features of L levels and per-image boxes in input pixels and return (R, C, S, S)
with R = total boxes of the batch, in the order of the input lists. With several levels
(FPN) each box is pooled from one level, chosen by its size (FPN paper eq. 1):
k = floor(k0 + log2(sqrt(w * h) / 224)), clamped to the available levels, k0 = 4.
The compiled kernels are torchvision.ops'.

Degenerate boxes get a defined output: a NaN coordinate (a diverged network) is read as 0
and every coordinate is clamped to +-1e6 px (so the sparse kernel never indexes outside the
map); an inverted or empty box (x2 < x1 or y2 < y1) has area 0 for the level assignment,
i.e. the finest level, and is pooled by the kernels as they define it. Every RoI gets a
level (asserted).

On the CPU, training with RoIAlign spends most of its time in torchvision's backward pass
(a serial scatter loop: 40 % of a quick-start iteration), and its forward reads NCHW
features with a stride of H*W floats between channels. ``sparse_roi_align`` computes the
same bilinear sampling as a sparse matrix W (one row per output bin, the same weights as
torchvision's kernel) so that forward is W @ F on channels-last rows and backward W^T @ dF,
both multi-threaded sparse-dense products. It is used on the CPU with a fixed
``sampling_ratio`` and is tested against torchvision's forward and backward (equal up to
float rounding: ~1e-7 relative).
"""

from __future__ import annotations

import math
import warnings
from typing import List, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool


def _bilinear_entries(rois: Tensor, scale: float, size: int, sr: int, aligned: bool, height: int, width: int):
    """Sparse bilinear weights of torchvision's RoIAlign (same arithmetic as its CPU kernel).

    rois (R, 5) -> (rows, cols, weights): output bin r * S * S + py * S + px takes
    weight * F[col] for col = n * H * W + y * W + x (sr x sr samples x 4 corners per bin).
    """
    r = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    rw = rois[:, 3] * scale - offset - x1
    rh = rois[:, 4] * scale - offset - y1
    if not aligned:  # the legacy (Fast R-CNN) RoIAlign forces at least 1x1 regions
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bw, bh = rw / size, rh / size
    p = torch.arange(size, dtype=rois.dtype, device=rois.device)[None, :, None]
    i = torch.arange(sr, dtype=rois.dtype, device=rois.device)[None, None, :]
    ys = y1[:, None, None] + p * bh[:, None, None] + (i + 0.5) * bh[:, None, None] / sr  # (R, S, sr)
    xs = x1[:, None, None] + p * bw[:, None, None] + (i + 0.5) * bw[:, None, None] / sr
    shape = (r, size, size, sr, sr)  # (roi, py, px, iy, ix): bins stay contiguous
    y = ys[:, :, None, :, None].expand(shape)
    x = xs[:, None, :, None, :].expand(shape)
    valid = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.long(), x.long()
    y_cap, x_cap = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_cap, torch.full_like(y_low, height - 1), y_low)
    x_low = torch.where(x_cap, torch.full_like(x_low, width - 1), x_low)
    y_high = torch.where(y_cap, y_low, y_low + 1)
    x_high = torch.where(x_cap, x_low, x_low + 1)
    y = torch.where(y_cap, y_low.to(y.dtype), y)
    x = torch.where(x_cap, x_low.to(x.dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    base = (batch * (height * width))[:, None, None, None, None]
    cols = torch.stack(
        [
            base + y_low * width + x_low,
            base + y_low * width + x_high,
            base + y_high * width + x_low,
            base + y_high * width + x_high,
        ],
        -1,
    )
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * (valid[..., None].to(rois.dtype) / (sr * sr))
    rows = torch.arange(r * size * size, device=rois.device).view(r, size, size, 1, 1, 1).expand(cols.shape)
    return rows.reshape(-1), cols.reshape(-1), weights.reshape(-1)


def _csr(coo: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()  # coalesces: samples sharing a pixel merge into one entry


class _SparseRoIAlignFn(torch.autograd.Function):
    """out = W @ F and dF = W^T @ dOut, with W the sparse bilinear matrix and F the feature
    map as (N*H*W, C) rows: channels contiguous, where torchvision's NCHW kernel strides
    H*W floats between the channels of one sample (2x faster on large maps)."""

    @staticmethod
    def forward(ctx, feature, rois, scale, size, sr, aligned):
        n, c, h, w = feature.shape
        rows, cols, weights = _bilinear_entries(rois, scale, size, sr, aligned, h, w)
        shape = (rois.shape[0] * size * size, n * h * w)
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), weights.to(feature.dtype), shape, check_invariants=False
        )
        flat = feature.permute(0, 2, 3, 1).reshape(n * h * w, c)
        out = (_csr(coo) @ flat).view(rois.shape[0], size, size, c).permute(0, 3, 1, 2)
        if feature.requires_grad:
            ctx.save_for_backward(coo)
            ctx.shape = (n, c, h, w)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        (coo,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        g = grad.permute(0, 2, 3, 1).reshape(-1, c)
        grad_feature = (_csr(coo.t()) @ g).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_feature, None, None, None, None, None


def sparse_roi_align(
    feature: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool = False
) -> Tensor:
    """torchvision.ops.roi_align's result (fixed sampling_ratio > 0) with a fast CPU backward."""
    if sampling_ratio <= 0:
        raise ValueError("sparse_roi_align needs a fixed sampling_ratio > 0")
    if rois.shape[0] == 0:
        return feature.new_zeros((0, feature.shape[1], output_size, output_size))
    return _SparseRoIAlignFn.apply(
        feature, rois, float(spatial_scale), int(output_size), int(sampling_ratio), bool(aligned)
    )


def boxes_to_rois(boxes: List[Tensor]) -> Tensor:
    """[(R_i, 4)] -> (R, 5) rows (batch index, x1, y1, x2, y2), the layout of torchvision.ops."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois, 0) if rois else torch.zeros((0, 5))


def assign_levels(
    boxes: Tensor,
    min_level: int,
    max_level: int,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """(R, 4) -> (R,) index into the levels [min_level .. max_level] (0 = min_level).
    ``eps`` keeps a box of exactly 224 px from falling one level down by rounding.
    Inverted sides count as 0 and a NaN area as 0: such boxes go to the finest level
    (log2(0) = -inf, clamped), never to an undefined one."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    area = torch.nan_to_num(widths * heights, nan=0.0)
    levels = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_size) + eps)
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


_MAX_COORD = 1e6  # px; far beyond any image, small enough for exact int64 indices


class RoIPooler(nn.Module):
    """scales: one per feature level, 1 / stride (e.g. [1/4, 1/8, 1/16, 1/32] for P2..P5);
    powers of 1/2 of consecutive levels.
    sampling_ratio, aligned: RoIAlign's sampling points per bin (0 = adaptive) and half-pixel
    correction (torchvision's Faster R-CNN uses 2 and False; detectron2's ROIAlignV2 is 0 and
    True). Neither applies to ``roi_pool`` (max pooling over quantised bins samples every
    pixel of a bin): sampling_ratio is ignored there and ``aligned=True`` is refused.
    cpu_sparse: use ``sparse_roi_align`` on the CPU (same values up to float rounding)."""

    def __init__(
        self,
        output_size: int = 7,
        scales: Sequence[float] = (1.0 / 16,),
        kind: str = "roi_align",
        sampling_ratio: int = 2,
        aligned: bool = False,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
        cpu_sparse: bool = True,
    ):
        super().__init__()
        if kind not in ("roi_align", "roi_pool"):
            raise ValueError(f"unknown pooler kind '{kind}' (use roi_align or roi_pool)")
        if kind == "roi_pool" and aligned:
            raise ValueError("aligned=True is RoIAlign's half-pixel offset; roi_pool quantises boxes instead")
        self.output_size = int(output_size)
        self.scales = [float(s) for s in scales]
        self.kind = kind
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        levels = [-math.log2(s) for s in self.scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"pooler scales must be powers of 1/2, got {self.scales}")
        self.min_level, self.max_level = int(round(levels[0])), int(round(levels[-1]))
        if self.max_level - self.min_level + 1 != len(self.scales):
            raise ValueError(f"pooler scales must be consecutive levels, got {self.scales}")
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)
        # False: torchvision's kernel everywhere, for bit-for-bit agreement with torchvision.
        self.cpu_sparse = bool(cpu_sparse)

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.kind == "roi_pool":
            return roi_pool(feature, rois, self.output_size, scale)
        if self.cpu_sparse and feature.device.type == "cpu" and self.sampling_ratio > 0:
            return sparse_roi_align(
                feature, rois.to(feature.dtype), self.output_size, scale, self.sampling_ratio, self.aligned
            )
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, features: List[Tensor], boxes: List[Tensor]) -> Tensor:
        """features: L tensors (N, C, H_l, W_l); boxes: N tensors (R_i, 4) -> (R, C, S, S)."""
        if len(features) != len(self.scales):
            raise ValueError(f"pooler expects {len(self.scales)} feature levels, got {len(features)}")
        # RoIs stay float32 even when features are fp16 (autocast): fp16 would round a
        # coordinate near 1000 px to 0.5 px.
        rois = boxes_to_rois([b.float() for b in boxes])
        coords = torch.nan_to_num(rois[:, 1:], nan=0.0).clamp(-_MAX_COORD, _MAX_COORD)
        rois = torch.cat([rois[:, :1], coords], dim=1)
        if len(features) == 1:
            return self._pool(features[0], rois, self.scales[0])
        levels = assign_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        c = features[0].shape[1]
        # Every RoI is written by exactly one level below, so no zero fill is needed.
        out = features[0].new_empty((rois.shape[0], c, self.output_size, self.output_size))
        written = 0
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            written += idx.numel()
            if idx.numel():
                out[idx] = self._pool(feature, rois[idx], scale).to(out.dtype)
        assert written == rois.shape[0], f"{rois.shape[0] - written} RoIs got no pyramid level"
        return out

    def extra_repr(self) -> str:
        sampling = f", sampling_ratio={self.sampling_ratio}, aligned={self.aligned}" if self.kind == "roi_align" else ""
        return f"kind={self.kind}, output_size={self.output_size}, scales={self.scales}{sampling}"

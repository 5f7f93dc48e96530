"""Poolers: how a region becomes a fixed-size feature, the part the lineage keeps swapping.

    RoIPooler(kind="roi_pool")   Fast R-CNN sec. 2.1: max-pool each RoI into S x S bins
    RoIPooler(kind="roi_align")  Mask R-CNN sec. 3: bilinear sampling, no quantisation
    SPPPooler(levels)            SPP-net sec. 2.3: max-pool each window into a pyramid of bins
    WarpPooler(size, context)    R-CNN appendix A: crop + warp each region of the image itself

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
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool


def _axis_samples(start: Tensor, bin_size: Tensor, size: int, sr: int, length: int):
    """One axis of torchvision's RoIAlign sampling (its CPU kernel's arithmetic): per RoI,
    bin p and sample i, the sample coordinate start + p * bin + (i + 0.5) * bin / sr
    -> (low, high, frac, valid), each (R, S, sr): the two neighbouring pixels, the weight of
    ``high`` and whether the sample lies within [-1, length]."""
    p = torch.arange(size, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(sr, dtype=start.dtype, device=start.device)[None, None, :]
    c = start[:, None, None] + p * bin_size[:, None, None] + (i + 0.5) * bin_size[:, None, None] / sr
    valid = (c >= -1.0) & (c <= length)
    c = c.clamp(min=0)
    low = c.long()
    cap = low >= length - 1
    low = torch.where(cap, torch.full_like(low, length - 1), low)
    high = torch.where(cap, low, low + 1)
    c = torch.where(cap, low.to(c.dtype), c)
    return low, high, c - low, valid


def _bilinear_entries(rois: Tensor, scale: float, size: int, sr: int, aligned: bool, height: int, width: int):
    """Sparse bilinear weights of torchvision's RoIAlign (same arithmetic as its CPU kernel).

    rois (R, 5) -> (cols, weights), each (R * S * S * 4 * sr * sr,): output bin
    r * S * S + py * S + px takes weight * F[col] for col = n * H * W + y * W + x from its
    4 * sr * sr consecutive entries (sr x sr samples x 4 corners). Bilinear sampling is
    separable, so y and x are computed per (RoI, bin, sample) along their own axis and
    only combined at the end.
    """
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    rw = rois[:, 3] * scale - offset - x1
    rh = rois[:, 4] * scale - offset - y1
    if not aligned:  # the legacy (Fast R-CNN) RoIAlign forces at least 1x1 regions
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    y_low, y_high, ly, y_valid = _axis_samples(y1, rh / size, size, sr, height)
    x_low, x_high, lx, x_valid = _axis_samples(x1, rw / size, size, sr, width)
    r = rois.shape[0]
    # (roi, py, px, iy, ix): y varies along py / iy, x along px / ix; bins stay contiguous
    y_low, y_high, ly, y_valid = (t.view(r, size, 1, sr, 1) for t in (y_low, y_high, ly, y_valid))
    x_low, x_high, lx, x_valid = (t.view(r, 1, size, 1, sr) for t in (x_low, x_high, lx, x_valid))
    hy, hx = 1 - ly, 1 - lx
    base = (batch * (height * width)).view(r, 1, 1, 1, 1)
    row_low, row_high = base + y_low * width, base + y_high * width
    cols = torch.stack([row_low + x_low, row_low + x_high, row_high + x_low, row_high + x_high], -1)
    keep = (y_valid & x_valid).to(rois.dtype) / (sr * sr)
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * keep[..., None]
    return cols.reshape(-1), weights.reshape(-1)


def _row_major_csr(cols: Tensor, weights: Tensor, per_row: int, shape: Tuple[int, int]) -> Tensor:
    """W as CSR straight from ``_bilinear_entries``' order (every output bin's
    ``per_row`` entries in a row, bins in order): no sort / coalesce pass, which took a
    third of the pooling time at inference. Repeated columns in a row (samples sharing a
    pixel) are summed by the product, as coalescing would."""
    crow = torch.arange(0, cols.numel() + 1, per_row, device=cols.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, weights, shape, check_invariants=False)


def _transposed_csr(cols: Tensor, weights: Tensor, per_row: int, shape: Tuple[int, int]) -> Tensor:
    """W^T as CSR, W (``shape``) given as in ``_row_major_csr``: its entries grouped by
    column (one stable sort of the column indices, as 32-bit keys when they fit) and each
    entry's row recovered from its position (entry e belongs to row e // per_row). Repeated
    (row, column) pairs stay apart and are summed by the product. A COO transpose coalesced
    into CSR gives the same matrix but sorts 64-bit (row, column) keys and merges them: a
    BCCD recipe training step with this build takes 0.90 (bf16) / 0.93 (float32) of its time
    with that one (tools/probe_sparse_backward.py, 2 cores, 2026-12-01)."""
    keys = cols.to(torch.int32) if shape[1] < 2**31 else cols
    sorted_cols, order = torch.sort(keys, stable=True)
    counts = torch.bincount(sorted_cols, minlength=shape[1])
    crow = torch.zeros(shape[1] + 1, dtype=torch.int64, device=cols.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow, order // per_row, weights[order], (shape[1], shape[0]), check_invariants=False
        )


class _SparseRoIAlignFn(torch.autograd.Function):
    """out = W @ F and dF = W^T @ dOut, with W the sparse bilinear matrix and F the feature
    map as (N*H*W, C) rows: channels contiguous, where torchvision's NCHW kernel strides
    H*W floats between the channels of one sample (2x faster on large maps)."""

    @staticmethod
    def forward(ctx, feature, rois, scale, size, sr, aligned):
        n, c, h, w = feature.shape
        cols, weights = _bilinear_entries(rois, scale, size, sr, aligned, h, w)
        weights = weights.to(feature.dtype)
        shape = (rois.shape[0] * size * size, n * h * w)
        flat = feature.permute(0, 2, 3, 1).reshape(n * h * w, c)
        per_row = 4 * sr * sr
        out = _row_major_csr(cols, weights, per_row, shape) @ flat
        out = out.view(rois.shape[0], size, size, c).permute(0, 3, 1, 2)
        if feature.requires_grad:  # backward needs W^T
            ctx.save_for_backward(cols, weights)
            ctx.shape = (n, c, h, w)
            ctx.per_row = per_row
        return out  # (R, C, S, S) with channels innermost: sparse_roi_align decides the layout

    @staticmethod
    def backward(ctx, grad):
        cols, weights = ctx.saved_tensors
        n, c, h, w = ctx.shape
        g = grad.permute(0, 2, 3, 1).reshape(-1, c).to(weights.dtype)
        with torch.autocast(grad.device.type, enabled=False):  # float32 sparse product (see sparse_roi_align)
            w_t = _transposed_csr(cols, weights, ctx.per_row, (g.shape[0], n * h * w))
            grad_feature = (w_t @ g).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_feature, None, None, None, None, None


def sparse_roi_align(
    feature: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    contiguous: bool = True,
) -> Tensor:
    """torchvision.ops.roi_align's result (fixed sampling_ratio > 0) with a fast CPU backward.
    contiguous=False: the result may come with channels innermost (a caller that copies it
    anyway, as the multi-level pooler does, saves a copy)."""
    if sampling_ratio <= 0:
        raise ValueError("sparse_roi_align needs a fixed sampling_ratio > 0")
    if rois.shape[0] == 0:
        return feature.new_zeros((0, feature.shape[1], output_size, output_size))
    if feature.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(feature.device.type):
        # MKL's sparse products take float32 / float64 only: under autocast (a bfloat16 map
        # on the CPU) the map is pooled in float32, autocast off, and handed back in its dtype.
        with torch.autocast(feature.device.type, enabled=False):
            pooled = _SparseRoIAlignFn.apply(
                feature.float(),
                rois.float(),
                float(spatial_scale),
                int(output_size),
                int(sampling_ratio),
                bool(aligned),
            ).to(feature.dtype)
    else:
        pooled = _SparseRoIAlignFn.apply(
            feature, rois, float(spatial_scale), int(output_size), int(sampling_ratio), bool(aligned)
        )
    return pooled.contiguous() if contiguous else pooled


def boxes_to_rois(boxes: List[Tensor]) -> Tensor:
    """[(R_i, 4)] -> (R, 5) rows (batch index, x1, y1, x2, y2), the layout of torchvision.ops."""
    rois = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
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

    def _pool(self, feature: Tensor, rois: Tensor, scale: float, contiguous: bool = True) -> Tensor:
        if self.kind == "roi_pool":
            return roi_pool(feature, rois, self.output_size, scale)
        if self.cpu_sparse and feature.device.type == "cpu" and self.sampling_ratio > 0:
            return sparse_roi_align(
                feature,
                rois.to(feature.dtype),
                self.output_size,
                scale,
                self.sampling_ratio,
                self.aligned,
                contiguous=contiguous,
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
        # While tracing (export) every level is pooled, also an empty one: a skipped level
        # would be left out of the graph for every later input.
        tracing = torch.jit.is_tracing()
        written = 0
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if tracing:
                # scatter, not out[idx] = ...: the tracer records the latter with the traced
                # level's RoI count as a constant shape.
                pooled = self._pool(feature, rois[idx], scale).to(out.dtype)
                out = out.scatter(0, idx.view(-1, 1, 1, 1).expand_as(pooled), pooled)
            elif idx.numel():
                written += idx.numel()
                # copied into out here: the pooled levels need not be contiguous themselves
                out[idx] = self._pool(feature, rois[idx], scale, contiguous=False).to(out.dtype)
        assert tracing or written == rois.shape[0], f"{rois.shape[0] - written} RoIs got no pyramid level"
        return out

    def extra_repr(self) -> str:
        sampling = f", sampling_ratio={self.sampling_ratio}, aligned={self.aligned}" if self.kind == "roi_align" else ""
        return f"kind={self.kind}, output_size={self.output_size}, scales={self.scales}{sampling}"


# -- the classic poolers: SPP-net's spatial pyramid and R-CNN's warped crops -------------------
def spp_project(boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
    """SPP-net's window -> feature-map projection (He et al., ECCV 2014, appendix A): the
    left/top edge goes to x' = floor(x / S) + 1, the right/bottom edge to x' = ceil(x / S) - 1,
    in the paper's 1-based pixels. With detkit's continuous boxes (a VOC pixel x is
    [x - 1, x)) that is, 0-based and inclusive: left = floor((x1 + 1) / S),
    right = ceil(x2 / S) - 2. A window too small to span a cell keeps one cell (right >=
    left); everything is clipped to the map. (R, 4) -> (R, 4) integral cell indices."""
    x1 = torch.floor((boxes[:, 0] + 1) / stride)
    y1 = torch.floor((boxes[:, 1] + 1) / stride)
    x2 = torch.ceil(boxes[:, 2] / stride) - 2
    y2 = torch.ceil(boxes[:, 3] / stride) - 2
    x1 = x1.clamp(0, width - 1)
    y1 = y1.clamp(0, height - 1)
    x2 = torch.maximum(x2, x1).clamp(max=width - 1)
    y2 = torch.maximum(y2, y1).clamp(max=height - 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


class SPPPooler(nn.Module):
    """Spatial pyramid pooling of detection windows (SPP-net, He et al., ECCV 2014, sec. 2.3,
    4.1): each window, projected onto the feature map (``spp_project``), is max-pooled into
    n x n bins for every n in ``levels``; bin i of a window w cells wide spans cells
    [floor(i w / n), ceil((i + 1) w / n)) (the paper's floor on the left/top and ceiling on the
    right/bottom edge), which is exactly the bin rule of ``torchvision.ops.roi_pool`` on the
    projected integer window. Levels {6, 3, 2, 1} give 36 + 9 + 4 + 1 = 50 bins.

    features: one map (N, C, H, W) at ``stride``; boxes: N tensors (R_i, 4) in input pixels
    -> (R, C * sum(n^2)), each level flattened channel-major, levels in the given order."""

    def __init__(self, levels: Sequence[int] = (6, 3, 2, 1), stride: int = 16):
        super().__init__()
        if not levels or any(int(n) < 1 for n in levels):
            raise ValueError(f"SPP levels must be positive bin counts, got {list(levels)}")
        self.levels = [int(n) for n in levels]
        self.stride = int(stride)

    @property
    def num_bins(self) -> int:
        return sum(n * n for n in self.levels)

    def forward(self, features: List[Tensor], boxes: List[Tensor]) -> Tensor:
        if len(features) != 1:
            raise ValueError(f"SPPPooler pools one feature map, got {len(features)}")
        feature = features[0]
        h, w = feature.shape[-2:]
        projected = [spp_project(b.float(), self.stride, h, w) for b in boxes]
        rois = boxes_to_rois(projected).to(feature.device, feature.dtype)
        if rois.shape[0] == 0:
            return feature.new_zeros((0, feature.shape[1] * self.num_bins))
        # spatial_scale 1: the windows are already in cells, so roi_pool's rounding is exact
        pooled = [roi_pool(feature, rois, (n, n), 1.0).flatten(1) for n in self.levels]
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, stride={self.stride}"


def context_windows(boxes: Tensor, size: int, context: int) -> Tensor:
    """R-CNN's dilated windows (appendix A): grow each box about its centre so that, warped to
    size x size, the original box fills the central (size - 2 context) pixels, i.e. by the
    factor size / (size - 2 context) per axis (227 / 195 for the paper's p = 16)."""
    factor = size / float(size - 2 * context)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw, hh = (boxes[:, 2] - boxes[:, 0]) * factor / 2, (boxes[:, 3] - boxes[:, 1]) * factor / 2
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


class WarpPooler(nn.Module):
    """R-CNN's region warping (Girshick et al., CVPR 2014, sec. 2.1 and appendix A): each
    region is dilated by ``context`` pixels at the warped scale (``context_windows``), then
    warped anisotropically with bilinear sampling to ``size`` x ``size``. Pixels of the window
    outside the image are filled with the image mean, which is 0 on normalised inputs (the
    pipeline subtracts the mean), so they are sampled as zeros.

    features: one map, the normalised image batch (N, 3, H, W) (stride 1); boxes: N tensors
    (R_i, 4) in input pixels -> (R, 3, size, size). Cost grows with R: a head should pool
    a few hundred regions at a time."""

    def __init__(self, size: int = 227, context: int = 16):
        super().__init__()
        if size < 1 or not 0 <= 2 * context < size:
            raise ValueError(f"warp size {size} with context {context}: need 0 <= 2 * context < size")
        self.size = int(size)
        self.context = int(context)

    def grid(self, windows: Tensor, height: int, width: int) -> Tensor:
        """(R, 4) windows -> (1, R * S, S, 2) grid_sample coordinates (align_corners=False):
        output pixel u samples x = x1 + (u + 0.5) * (x2 - x1) / S, normalised as 2x / W - 1."""
        s = self.size
        t = (torch.arange(s, device=windows.device, dtype=windows.dtype) + 0.5) / s  # (S,)
        xs = windows[:, 0:1] + t[None] * (windows[:, 2:3] - windows[:, 0:1])  # (R, S)
        ys = windows[:, 1:2] + t[None] * (windows[:, 3:4] - windows[:, 1:2])
        gx = (2 * xs / width - 1)[:, None, :].expand(-1, s, s)
        gy = (2 * ys / height - 1)[:, :, None].expand(-1, s, s)
        return torch.stack([gx, gy], dim=-1).reshape(1, -1, s, 2)

    def forward(self, features: List[Tensor], boxes: List[Tensor]) -> Tensor:
        if len(features) != 1:
            raise ValueError(f"WarpPooler crops from one map (the image), got {len(features)}")
        images = features[0]
        height, width = images.shape[-2:]
        s = self.size
        out = []
        for i, b in enumerate(boxes):
            if b.shape[0] == 0:
                continue
            windows = context_windows(b.float(), s, self.context)
            grid = self.grid(windows, height, width).to(images.dtype)
            crops = F.grid_sample(images[i : i + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out.append(crops.view(images.shape[1], b.shape[0], s, s).permute(1, 0, 2, 3))
        if not out:
            return images.new_zeros((0, images.shape[1], s, s))
        return torch.cat(out, 0)

    def extra_repr(self) -> str:
        return f"size={self.size}, context={self.context}"

"""Selective Search, step 2: region descriptors and the four similarities.

Uijlings et al., IJCV 2013, Sec. 3.2.2:

- colour: a 25-bin histogram per channel, L1-normalised over the whole descriptor, compared
  by histogram intersection;
- texture: Gaussian derivatives (sigma = 1) in 8 orientations per channel, a 10-bin
  histogram per orientation and channel, L1-normalised, histogram intersection;
- size: 1 - (size_i + size_j) / size_im, which makes small regions merge early;
- fill: 1 - (size(BB_ij) - size_i - size_j) / size_im, which favours regions that fill
  each other's gaps.

Shapes: P = H * W pixels, N regions, M feature maps (channels, or channels x orientations),
D histogram bins of one descriptor (C * 25 colour, C * 8 * 10 texture).

Histograms are computed for all regions at once with ``np.bincount`` over the label map;
the *bin index* of every pixel (which depends only on the image) is computed once per colour
space and reused by every threshold k and similarity that shares that colour space.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from detkit.errors import SelectiveSearchError

COLOUR_BINS = 25
TEXTURE_BINS = 10
TEXTURE_ORIENTATIONS = 8
TEXTURE_SIGMA = 1.0
# A map whose strongest response is below this (grey levels per pixel) has no texture: its
# "peak" would be float round-off, and scaling by it would spread noise over all 10 bins.
_NO_GRADIENT = 1e-3


def colour_bin_index(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (C, P) uint8: the colour bin (0..24) of every pixel in each channel."""
    image = _as_hwc(image)
    channels = image.reshape(-1, image.shape[2]).T.astype(np.uint16)
    return ((channels * COLOUR_BINS) >> 8).astype(np.uint8)  # 0..255 -> 25 equal slices


def texture_bin_index(image: np.ndarray, sigma: float = TEXTURE_SIGMA) -> np.ndarray:
    """(H, W, C) uint8 -> (C * 8, P) uint8: the texture bin (0..9) of every pixel in every
    (channel, orientation) map, channel-major.

    The derivative in direction theta is steered from the x and y Gaussian derivatives,
    cos(theta) Gx + sin(theta) Gy; orientation theta + 180 is its negation, so the 8
    orientations (0, 45, ..., 315 degrees) are the positive and negative halves of 4 steered
    responses. Each orientation's response is rectified (negative -> 0), scaled by its
    largest value in the image and cut into 10 equal bins.
    """
    image = _as_hwc(image)
    h, w, c = image.shape
    gauss, deriv = _gaussian_derivative_kernels(sigma)
    diag = np.float32(np.sqrt(0.5))
    bins = np.empty((c, TEXTURE_ORIENTATIONS, h * w), np.uint8)
    for ch in range(c):
        plane = image[:, :, ch].astype(np.float32)
        # sepFilter2D correlates: kernelX runs along x, kernelY along y.
        gx = cv2.sepFilter2D(plane, cv2.CV_32F, deriv, gauss, borderType=cv2.BORDER_REFLECT)
        gy = cv2.sepFilter2D(plane, cv2.CV_32F, gauss, deriv, borderType=cv2.BORDER_REFLECT)
        steered = (gx, (gx + gy) * diag, gy, (gy - gx) * diag)  # 0, 45, 90, 135 degrees
        for o, response in enumerate(steered):
            response = response.ravel()
            # orientation o is the positive half, o + 4 (theta + 180 degrees) the negative one
            for index, peak, sign in ((o, response.max(), 1.0), (o + 4, -response.min(), -1.0)):
                if peak <= _NO_GRADIENT:
                    bins[ch, index] = 0
                    continue
                scaled = response * np.float32(sign * TEXTURE_BINS / peak)
                np.clip(scaled, 0, TEXTURE_BINS - 1, out=scaled)  # negatives -> bin 0
                bins[ch, index] = scaled  # float -> uint8 truncates, i.e. floor
    return bins.reshape(c * TEXTURE_ORIENTATIONS, h * w)


def region_histograms(label_map: np.ndarray, num_regions: int, bin_index: np.ndarray, bins_per_map: int) -> np.ndarray:
    """Histograms of every region over the maps of ``bin_index`` (M, P), values in
    0..bins_per_map-1 -> (N, M * bins_per_map) float64, map-major, rows summing to 1.

    Each pixel votes once per map, so the L1 normalisation spreads one unit over all
    channels (and orientations) of the descriptor, as in the authors' code.
    """
    nb = bins_per_map
    base = np.asarray(label_map).ravel().astype(np.int64)
    maps = list(bin_index)
    counts = []
    # bincount dominates the cost, so count two maps in one pass where their joint bins fit
    # a uint8 code (texture: 10 x 10): a joint histogram whose row and column sums are the
    # two marginals. One small bincount per pass stays in cache.
    pair = nb * nb <= 256 and len(maps) > 1
    step = 2 if pair else 1
    for m in range(0, len(maps) - (len(maps) % step), step):
        if pair:
            code = maps[m] * np.uint8(nb) + maps[m + 1]  # uint8, < nb * nb
            joint = np.bincount(base * (nb * nb) + code, minlength=num_regions * nb * nb)
            joint = joint.reshape(num_regions, nb, nb)
            counts += [joint.sum(axis=2), joint.sum(axis=1)]
        else:
            counts.append(np.bincount(base * nb + maps[m], minlength=num_regions * nb).reshape(num_regions, nb))
    if pair and len(maps) % 2:
        counts.append(np.bincount(base * nb + maps[-1], minlength=num_regions * nb).reshape(num_regions, nb))
    hist = np.concatenate(counts, axis=1).astype(np.float64)
    totals = hist.sum(axis=1, keepdims=True)
    return hist / np.where(totals > 0, totals, 1.0)


def colour_histograms(
    label_map: np.ndarray, num_regions: int, image: Optional[np.ndarray], bin_index: Optional[np.ndarray] = None
) -> np.ndarray:
    """(N, C * 25) L1-normalised colour histograms of the regions of ``image``."""
    if bin_index is None:
        if image is None:
            raise SelectiveSearchError("colour_histograms needs the image or its bin_index")
        bin_index = colour_bin_index(image)
    return region_histograms(label_map, num_regions, bin_index, COLOUR_BINS)


def texture_histograms(
    label_map: np.ndarray, num_regions: int, image: Optional[np.ndarray], bin_index: Optional[np.ndarray] = None
) -> np.ndarray:
    """(N, C * 8 * 10) L1-normalised texture histograms of the regions of ``image``."""
    if bin_index is None:
        if image is None:
            raise SelectiveSearchError("texture_histograms needs the image or its bin_index")
        bin_index = texture_bin_index(image)
    return region_histograms(label_map, num_regions, bin_index, TEXTURE_BINS)


# --- similarities (all broadcast: scalars, (D,) vs (D,), or (D,) vs (R, D)) -------------


def histogram_intersection(hist_i: np.ndarray, hist_j: np.ndarray) -> np.ndarray:
    """sum_k min(h_i[k], h_j[k]); 1 for identical L1-normalised histograms, 0 for disjoint."""
    return np.minimum(hist_i, hist_j).sum(axis=-1)


def size_similarity(size_i, size_j, image_size) -> np.ndarray:
    """1 - (size_i + size_j) / size_im (sizes in pixels)."""
    return 1.0 - (np.asarray(size_i, np.float64) + size_j) / float(image_size)


def fill_similarity(box_i, box_j, size_i, size_j, image_size) -> np.ndarray:
    """1 - (size(BB_ij) - size_i - size_j) / size_im, BB_ij the box around both regions.

    Boxes are xyxy with exclusive ends, so a box's area is (x2 - x1) * (y2 - y1).
    """
    box_i = np.asarray(box_i)
    box_j = np.asarray(box_j)
    width = np.maximum(box_i[..., 2], box_j[..., 2]) - np.minimum(box_i[..., 0], box_j[..., 0])
    height = np.maximum(box_i[..., 3], box_j[..., 3]) - np.minimum(box_i[..., 1], box_j[..., 1])
    gap = width * height - np.asarray(size_i, np.float64) - size_j
    return 1.0 - gap / float(image_size)


def _as_hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image[:, :, None] if image.ndim == 2 else image


def _gaussian_derivative_kernels(sigma: float):
    """Sampled 1-D Gaussian (sums to 1) and its first derivative, as correlation kernels."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    gauss = np.exp(-0.5 * (x / sigma) ** 2)
    gauss /= gauss.sum()
    # d/dx of the Gaussian is -x/sigma^2 G; correlation flips the kernel, hence +x.
    deriv = x / sigma**2 * gauss
    return gauss.astype(np.float32), deriv.astype(np.float32)

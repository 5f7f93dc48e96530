"""Multi-scale testing with an image pyramid (Fast R-CNN sec. 5.2; SPP-net sec. 3.1.2).

Shapes: N images, R regions (over the batch, or of one image where said), L pyramid levels.

Both papers test "multi-scale" by brute force: the image is resized to each scale of a set
(shorter side s in {480, 576, 688, 864, 1200}), the convolutional features are computed once
per scale, and each region is pooled from the ONE scale at which it is closest to the
network's pre-training size:

    Fast R-CNN sec. 5.2: "each RoI is assigned to the scale such that the scaled RoI is
        closest to 224^2 pixels in area";
    SPP-net sec. 3.1.2: "we choose a single scale s in S such that the scaled candidate
        window has a number of pixels closest to 224 x 224".

In detkit the data pipeline resizes a test image to the LARGEST scale S_L
(``data.input.test_scales``), so that the proposals, the detections and their mapping back
to the original image all live in that one input. Level l is that input resized by
f_l = s_l / S_L (``rescale_images``: each image's valid region with the pipeline's own
bilinear resize, then padded again); the level with f = 1 is the input itself. A region of
area A (largest-scale pixels) goes to the level minimising |A f_l^2 - 224^2|
(``assign_scales``; a tie goes to the smaller scale). It is pooled there with its
coordinates multiplied by that image's exact per-axis factors, and the head's outputs are put
back in the regions' order (``pyramid_predict``). Box deltas are relative to the box (centre
offsets over width / height, log size ratios), so deltas predicted at any level apply to the
region at the largest scale unchanged.

This works for any head that pools regions from feature maps through
``predict(images, features, boxes)`` (``heads.base.RoIHeadBase``): the pooler itself is
untouched, the head is only called once per level with that level's features and regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detkit.data.transforms import resize_image
from detkit.structures import ImageList

#: The region area (pixels) each region is brought closest to: 224^2, the ImageNet
#: pre-training input (Fast R-CNN sec. 5.2, SPP-net sec. 3.1.2).
CANONICAL_AREA = 224.0 * 224.0


@dataclass
class PyramidLevel:
    """One scale of the pyramid: ``factor`` f = s / S_L (nominal), ``images`` the input
    resized by it, ``scales`` (N, 2) each image's exact per-axis factors (sx, sy) (the resize
    floors each side), ``features`` the backbone's maps of ``images``."""

    factor: float
    images: ImageList
    scales: Tensor
    features: Dict[str, Tensor]


def pyramid_factors(test_scales: Sequence[int]) -> List[float]:
    """Shorter sides -> factors relative to the largest, ascending (the largest is 1.0)."""
    top = max(test_scales)
    return [s / top for s in sorted(test_scales)]


def assign_scales(boxes: Tensor, factors: Sequence[float], canonical_area: float = CANONICAL_AREA) -> Tensor:
    """(R, 4) boxes at the largest scale -> (R,) index into ``factors``: the level where the
    box's area is closest to ``canonical_area``. Inverted sides count as 0 and a NaN area as
    0: such a box is equally far at every scale and goes to the smallest, never nowhere."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    area = torch.nan_to_num(widths * heights, nan=0.0).double()
    f2 = torch.tensor([f * f for f in factors], dtype=torch.float64, device=boxes.device)
    distance = (area[:, None] * f2[None, :] - canonical_area).abs()
    # argmin returns the first minimum: with ascending factors a tie goes to the smaller scale
    return distance.argmin(dim=1) if len(boxes) else torch.zeros((0,), dtype=torch.int64, device=boxes.device)


def rescale_images(images: ImageList, factor: float, size_divisibility: int) -> Tuple[ImageList, Tensor]:
    """Each image's valid region resized by ``factor`` (the data pipeline's bilinear resize),
    padded to a multiple of ``size_divisibility``. -> (images, (N, 2) exact (sx, sy))."""
    resized, scales = [], []
    for i, (h, w) in enumerate(images.image_sizes):
        image = resize_image(images.tensor[i, :, :h, :w], factor)
        nh, nw = image.shape[-2:]
        resized.append(image)
        scales.append((nw / w, nh / h))
    batch = ImageList.from_tensors(resized, size_divisibility, image_ids=images.image_ids)
    return batch, torch.tensor(scales, dtype=torch.float32, device=images.tensor.device)


def build_pyramid(
    backbone: Callable[[Tensor], Dict[str, Tensor]],
    images: ImageList,
    features: Dict[str, Tensor],
    factors: Sequence[float],
    size_divisibility: int,
    channels_last: bool = False,
) -> List[PyramidLevel]:
    """The levels for ``factors`` (ascending, the last 1.0): the backbone runs on each
    rescaled input; level 1.0 reuses ``features`` of ``images`` as they are."""
    levels = []
    for factor in factors:
        if factor == 1.0:
            ones = torch.ones((len(images), 2), device=images.tensor.device)
            levels.append(PyramidLevel(1.0, images, ones, features))
            continue
        scaled, scales = rescale_images(images, factor, size_divisibility)
        x = scaled.tensor.contiguous(memory_format=torch.channels_last) if channels_last else scaled.tensor
        levels.append(PyramidLevel(factor, scaled, scales, backbone(x)))
    return levels


Predict = Callable[[ImageList, Dict[str, Tensor], List[Tensor]], Tuple[Tensor, Optional[Tensor]]]


def pyramid_predict(
    predict: Predict, levels: Sequence[PyramidLevel], boxes: List[Tensor]
) -> Tuple[Tensor, Optional[Tensor]]:
    """A head's ``predict`` over the pyramid: each region at its level (``assign_scales``),
    outputs in the order of ``boxes`` (per image (R_i, 4) at the largest scale), as the
    single-scale ``predict(images, features, boxes)`` returns them."""
    factors = [lv.factor for lv in levels]
    choice = [assign_scales(b, factors) for b in boxes]
    offsets = [0]
    for b in boxes:
        offsets.append(offsets[-1] + len(b))
    if offsets[-1] == 0:  # no region at all: the top level gives the empty outputs' shapes
        return predict(levels[-1].images, levels[-1].features, boxes)
    class_out: Optional[Tensor] = None
    deltas_out: Optional[Tensor] = None
    for index, level in enumerate(levels):
        picked = [torch.nonzero(c == index).squeeze(1) for c in choice]
        if sum(p.numel() for p in picked) == 0:
            continue
        # per image: the level's regions, scaled by the image's exact factors (sx, sy, sx, sy)
        scaled = [b[p] * level.scales[i].repeat(2) for i, (b, p) in enumerate(zip(boxes, picked))]
        class_outputs, deltas = predict(level.images, level.features, scaled)
        rows = torch.cat([p + offsets[i] for i, p in enumerate(picked)])
        if class_out is None:
            class_out = class_outputs.new_zeros((offsets[-1],) + tuple(class_outputs.shape[1:]))
            if deltas is not None:
                deltas_out = deltas.new_zeros((offsets[-1],) + tuple(deltas.shape[1:]))
        class_out[rows] = class_outputs.to(class_out.dtype)
        if deltas is not None and deltas_out is not None:
            deltas_out[rows] = deltas.to(deltas_out.dtype)
    assert class_out is not None  # offsets[-1] > 0: some level got the regions
    return class_out, deltas_out

"""Box-aware transforms on ``(image, target)`` pairs.

image: float32 tensor (3, H, W); target: a ``detkit.structures.Target`` as produced by
``DetectionDataset`` (boxes (R, 4) xyxy in the current image's pixels, labels, difficult,
image_id, geometry) or None. Every geometric transform moves the boxes with a one-step
``Geometry`` and records itself in ``target.geometry`` (original size, resize, flip), so
that proposal files and detections are mapped between original and input pixels by that
one record (``Geometry.apply`` / ``Geometry.invert``).

Resizing follows the convention of the Fast/Faster R-CNN papers (shorter side to a target
length, longer side capped) and is computed exactly as torchvision's detection transform
does (same scale, same bilinear interpolation), so that detkit and torchvision feed a model
the same pixels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from detkit.structures import Geometry, Target

# ImageNet statistics, for backbones from torchvision.models (and what they were trained with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def resize_scale(height: int, width: int, short: float, max_size: float) -> float:
    """The factor that brings the shorter side to ``short`` unless the longer side would
    exceed ``max_size``."""
    return min(short / min(height, width), max_size / max(height, width))


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """(C, H, W) -> (C, floor(H*scale), floor(W*scale)), bilinear, as torchvision's
    GeneralizedRCNNTransform (recompute_scale_factor=True, align_corners=False)."""
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def _moved(target: Target, step: Geometry) -> Target:
    """The target after one geometric step (``step`` maps the current image to the new one):
    boxes moved by it, and the step composed into the target's record."""
    h, w = step.orig_size
    geometry = target.geometry or Geometry.identity(h, w)
    if step.flipped:
        geometry = geometry.mirrored()
    elif step.vflipped:
        geometry = geometry.mirrored_vertically()
    else:
        geometry = geometry.resized(*step.size)
    boxes = step.apply(target.boxes) if target.boxes.numel() else target.boxes
    return replace(target, boxes=boxes, geometry=geometry)


class ResizeShortestEdge:
    """Resize so that the shorter side is ``min_sizes`` (one chosen at random per image when
    several are given: multi-scale training, Fast R-CNN paper sec. 5.2) and the longer side is
    at most ``max_size``. Boxes are scaled by the same per-axis factors as the pixels."""

    def __init__(self, min_sizes: Union[int, Sequence[int]], max_size: int):
        sizes = [min_sizes] if isinstance(min_sizes, (int, float)) else list(min_sizes)
        if not sizes:
            raise ValueError("ResizeShortestEdge needs at least one size")
        self.min_sizes = [int(s) for s in sizes]
        self.max_size = int(max_size)

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        # torch RNG: seeded by the trainer and per DataLoader worker; a single size draws
        # nothing, so test-time resizing never moves the training stream.
        if len(self.min_sizes) == 1:
            short = self.min_sizes[0]
        else:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        image = resize_image(image, resize_scale(h, w, short, self.max_size))
        if target is not None:
            target = _moved(target, Geometry.identity(h, w).resized(*image.shape[-2:]))
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


class _RandomMirror:
    """Mirror image and boxes along one axis with probability ``p`` (one draw from torch's RNG
    per call), the step recorded in ``target.geometry``."""

    dim = -1  # the image axis reversed

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def _step(self, height: int, width: int) -> Geometry:
        raise NotImplementedError

    def __call__(self, image, target):
        if self.p > 0 and float(torch.rand(())) < self.p:
            image = image.flip(self.dim)
            if target is not None:
                target = _moved(target, self._step(*image.shape[-2:]))
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomHorizontalFlip(_RandomMirror):
    """Mirror left to right with probability ``p``."""

    dim = -1

    def _step(self, height: int, width: int) -> Geometry:
        return Geometry.identity(height, width).mirrored()


class RandomVerticalFlip(_RandomMirror):
    """Turn upside down with probability ``p``: for images without an up and a down
    (microscopy, aerial), as mmdetection's ``RandomFlip(direction='vertical')``."""

    dim = -2

    def _step(self, height: int, width: int) -> Geometry:
        return Geometry.identity(height, width).mirrored_vertically()


class ColorJitter:
    """Photometric jitter (boxes untouched), torchvision's implementation."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, image, target):
        return self.jitter(image).clamp_(0, 1), target

    def __repr__(self) -> str:
        return repr(self.jitter)


class Normalize:
    """(x - mean) / std per channel, on [0, 1] images."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, image, target):
        return v2.functional.normalize(image, self.mean, self.std), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(
    train: bool,
    min_size_train: Sequence[int] = (800,),
    max_size: int = 1333,
    min_size_test: int = 800,
    flip_prob: float = 0.5,
    vflip_prob: float = 0.0,
    color_jitter: Optional[Tuple[float, float, float, float]] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The standard detection pipeline: (jitter) -> normalize -> resize -> (flip) -> (vertical flip).

    Normalising before resizing is torchvision's order; bilinear resizing commutes with the
    per-channel affine normalisation, and doing it in the same order makes detkit's inputs
    bit-identical to torchvision's (needed for converted weights to give the same boxes)."""
    ts: List[Callable] = []
    if train and color_jitter is not None and any(color_jitter):
        ts.append(ColorJitter(*color_jitter))
    ts.append(Normalize(mean, std))
    ts.append(ResizeShortestEdge(min_size_train if train else [min_size_test], max_size))
    if train and flip_prob > 0:
        ts.append(RandomHorizontalFlip(flip_prob))
    if train and vflip_prob > 0:
        ts.append(RandomVerticalFlip(vflip_prob))
    return Compose(ts)


def unnormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of Normalize: (3, H, W) normalised -> [0, 1]."""
    m = image.new_tensor(mean)[:, None, None]
    s = image.new_tensor(std)[:, None, None]
    return (image * s + m).clamp_(0, 1)

"""Data structures and conventions shared by every part of detkit.

Conventions, stated once:

- Boxes are float32 ``xyxy`` in absolute pixels of the image they refer to. A box
  (x1, y1, x2, y2) covers the continuous area x1 <= x < x2, so its width is x2 - x1.
  Pascal VOC's 1-based inclusive pixels (xmin..xmax) become (xmin - 1, ymin - 1, xmax, ymax):
  the continuous width xmax - xmin + 1 is then exactly VOC's inclusive width. Conversions
  to and from file formats (VOC XML, COCO xywh, proposal files) happen only at the edges.
- Labels: ``BACKGROUND = 0``; foreground classes are 1..K and ``class_names[k - 1]`` names
  label k. "num_classes" in detkit never counts background unless a docstring says so.
- Shape shorthand used in docstrings: N images in a batch, R boxes (regions), K foreground
  classes, A anchors per location, C channels, H x W spatial size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

BACKGROUND = 0

ImageId = Union[str, int]


@dataclass
class ImageRecord:
    """Annotation of one image as loaded from disk, in that image's original pixels.

    boxes: (R, 4) float32 xyxy; labels: (R,) int64 in 1..K; difficult: (R,) bool marks
    regions that are neither training positives nor counted by metrics (VOC ``difficult``,
    COCO ``iscrowd``).
    """

    image_id: ImageId
    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(f"{self.file_name}: boxes, labels and difficult differ in length")


@dataclass
class Proposals:
    """Region proposals of one image: boxes (R, 4) xyxy in network-input pixels, scores (R,)
    sorted high to low (for Selective Search the score encodes the rank)."""

    boxes: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device) -> "Proposals":
        return Proposals(self.boxes.to(device), self.scores.to(device))

    def detach(self) -> "Proposals":
        return Proposals(self.boxes.detach(), self.scores.detach())


@dataclass
class Detections:
    """Final detections of one image: boxes (R, 4) xyxy, scores (R,), labels (R,) in 1..K."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    @staticmethod
    def empty(device=None) -> "Detections":
        return Detections(
            torch.zeros((0, 4), device=device),
            torch.zeros((0,), device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )


@dataclass
class ImageList:
    """A padded batch of network inputs.

    tensor: (N, C, H, W), every image padded at the bottom/right to a common size.
    image_sizes: per image (h, w) of the valid region before padding (after resizing).
    orig_sizes: per image (h, w) of the original image; detections are mapped back to these.
    image_ids: per image its dataset id (used by precomputed proposal files).
    flipped: per image whether the data pipeline mirrored it (precomputed proposals, which
        are stored for the unflipped original, must be mirrored too).
    """

    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    orig_sizes: Optional[List[Tuple[int, int]]] = None
    image_ids: Optional[List[ImageId]] = None
    flipped: Optional[List[bool]] = None

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes, self.orig_sizes, self.image_ids, self.flipped)

    @staticmethod
    def from_tensors(
        tensors: Sequence[torch.Tensor],
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        orig_sizes=None,
        image_ids=None,
        flipped=None,
    ) -> "ImageList":
        """Pads (C, H_i, W_i) images to a common (H, W), rounded up to a multiple of
        ``size_divisibility`` so that every FPN level has an integer size."""
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(s[0] for s in sizes)
        max_w = max(s[1] for s in sizes)
        if size_divisibility > 1:
            d = size_divisibility
            max_h = (max_h + d - 1) // d * d
            max_w = (max_w + d - 1) // d * d
        batch = tensors[0].new_full((len(tensors), tensors[0].shape[0], max_h, max_w), pad_value)
        for img, pad in zip(tensors, batch):
            pad[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batch, sizes, orig_sizes, image_ids, flipped)

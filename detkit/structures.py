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

from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class Geometry:
    """What the data pipeline did to one image: the one record that maps boxes between the
    original image's pixels and the network input's pixels.

    orig_size: (h, w) of the original image; size: (h, w) of the network input after the
        transforms (before batch padding); flipped: mirrored horizontally AFTER resizing (the
        order of ``detkit.data.transforms.build_transforms``); vflipped: mirrored vertically,
        also after resizing (the two mirrors act on different axes, so their order is free).

    Each axis was scaled by size / orig_size (the resize floors each side, so the two axes'
    factors differ slightly). ``apply`` takes original boxes into the input, ``invert`` takes
    input boxes back; the transforms, the precomputed-proposal generator, the detector's
    ``map_to_original`` and the RPN proposal dump all go through these two methods.
    """

    orig_size: Tuple[int, int]
    size: Tuple[int, int]
    flipped: bool = False
    vflipped: bool = False

    @staticmethod
    def identity(height: int, width: int) -> "Geometry":
        return Geometry((int(height), int(width)), (int(height), int(width)), False)

    @property
    def scale(self) -> Tuple[float, float]:
        """(sy, sx): input pixels per original pixel along each axis."""
        return self.size[0] / self.orig_size[0], self.size[1] / self.orig_size[1]

    def resized(self, height: int, width: int) -> "Geometry":
        """The record after resizing the current input to (height, width)."""
        if self.flipped or self.vflipped:
            raise ValueError("Geometry: resizing after a flip is not supported (flip last)")
        return Geometry(self.orig_size, (int(height), int(width)))

    def mirrored(self) -> "Geometry":
        """The record after a horizontal mirror of the current input."""
        return Geometry(self.orig_size, self.size, not self.flipped, self.vflipped)

    def mirrored_vertically(self) -> "Geometry":
        """The record after a vertical mirror (upside down) of the current input."""
        return Geometry(self.orig_size, self.size, self.flipped, not self.vflipped)

    def apply(self, boxes: torch.Tensor) -> torch.Tensor:
        """(R, 4) xyxy boxes in original pixels -> network-input pixels."""
        h, w = self.size
        sy, sx = self.scale
        out = boxes * boxes.new_tensor([sx, sy, sx, sy])
        if self.flipped:
            out = torch.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], dim=1)
        if self.vflipped:
            out = torch.stack([out[:, 0], h - out[:, 3], out[:, 2], h - out[:, 1]], dim=1)
        return out

    def invert(self, boxes: torch.Tensor) -> torch.Tensor:
        """(R, 4) xyxy boxes in network-input pixels -> original pixels."""
        h, w = self.size
        oh, ow = self.orig_size
        if self.flipped:
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        if self.vflipped:
            boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)
        # The ratio orig / resized in float32, as torchvision's resize_boxes computes it, so
        # that converted torchvision models give bit-identical boxes.
        rw = torch.tensor(ow, dtype=torch.float32) / torch.tensor(w, dtype=torch.float32)
        rh = torch.tensor(oh, dtype=torch.float32) / torch.tensor(h, dtype=torch.float32)
        return boxes * torch.stack([rw, rh, rw, rh]).to(boxes)


@dataclass
class Target:
    """Ground truth of one image as the model sees it.

    boxes: (R, 4) float32 xyxy in network-input pixels (the transforms keep them there);
    labels: (R,) int64 in 1..K; difficult: (R,) bool, neither training positives (unless
    the model trains on difficult boxes) nor counted by metrics; image_id: the dataset id;
    geometry: how the input was made from the original image (None: unknown, taken as the
    identity).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: Optional[torch.Tensor] = None
    image_id: Optional[ImageId] = None
    geometry: Optional[Geometry] = None

    def __post_init__(self):
        if self.difficult is None:
            self.difficult = torch.zeros((self.boxes.shape[0],), dtype=torch.bool, device=self.boxes.device)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device) -> "Target":
        assert self.difficult is not None
        return replace(
            self, boxes=self.boxes.to(device), labels=self.labels.to(device), difficult=self.difficult.to(device)
        )


@dataclass
class ImageList:
    """A padded batch of network inputs.

    tensor: (N, C, H, W), every image padded at the bottom/right to a common size.
    image_sizes: per image (h, w) of the valid region before padding (after resizing).
    geometries: per image what the data pipeline did (original size, resize, flip); boxes
        go between input and original pixels through them. None: the inputs are originals.
    image_ids: per image its dataset id (used by precomputed proposal files).
    """

    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    geometries: Optional[List[Geometry]] = None
    image_ids: Optional[List[ImageId]] = None

    def __len__(self) -> int:
        return len(self.image_sizes)

    def geometry(self, i: int) -> Geometry:
        """Image i's record (the identity when the batch carries none)."""
        if self.geometries is None:
            return Geometry.identity(*self.image_sizes[i])
        return self.geometries[i]

    def to(self, device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes, self.geometries, self.image_ids)

    @staticmethod
    def from_tensors(
        tensors: Sequence[torch.Tensor],
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        geometries: Optional[List[Geometry]] = None,
        image_ids: Optional[List[ImageId]] = None,
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
        return ImageList(batch, sizes, geometries, image_ids)

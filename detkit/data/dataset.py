"""The one dataset class every loader (VOC, COCO, generated shapes) produces.

A loader parses annotations into ``ImageRecord``s (original pixels, detkit's xyxy
convention, see ``detkit.structures``); ``DetectionDataset`` then reads images lazily and
applies the box-aware transforms. Each item is ``(image, target)`` with

    image:  float32 tensor (3, H, W) in [0, 1] before normalisation (after the transforms
            it is whatever they make of it: usually resized and normalised)
    target: detkit.structures.Target(boxes=(R, 4) float32 xyxy, labels=(R,) int64 in 1..K,
                 difficult=(R,) bool, image_id, geometry)

where ``geometry`` records how the transforms made the network input from the original
image (``Geometry.apply`` / ``invert`` map boxes between the two).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from detkit.structures import Geometry, ImageId, ImageRecord, Target


class DetectionDataset(torch.utils.data.Dataset):
    """Records + class names + how to read images.

    native_offset: what to add to (x1, y1) to get the annotation file's own coordinates
        (1.0 for VOC XML's 1-based inclusive pixels, 0.0 for COCO json); detection files and
        the VOC metric work in those native coordinates.
    coco: the ``pycocotools.coco.COCO`` object for COCO datasets (None otherwise).
    label_to_cat_id: label (1..K) -> category id used in detection files (COCO json ids for
        COCO datasets, the label itself otherwise).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        native_offset: float = 0.0,
        coco=None,
        label_to_cat_id: Optional[Dict[int, int]] = None,
        transforms: Optional[Callable] = None,
        name: str = "dataset",
        problems=None,
    ):
        self.records: List[ImageRecord] = list(records)
        self.class_names: List[str] = list(class_names)
        self.native_offset = float(native_offset)
        self.coco = coco
        self.label_to_cat_id = dict(label_to_cat_id or {k: k for k in range(1, len(class_names) + 1)})
        self.cat_id_to_label = {c: k for k, c in self.label_to_cat_id.items()}
        self.transforms = transforms
        self.name = name
        self.id_to_index: Dict[ImageId, int] = {r.image_id: i for i, r in enumerate(self.records)}
        # What the loader skipped or fixed (a detkit.data.io.ProblemLog), for `detkit data check`.
        self.problems = problems

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (background not counted)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> np.ndarray:
        """(N,) height / width of every image, for aspect-ratio grouped batching."""
        return np.array([r.height / max(r.width, 1) for r in self.records], dtype=np.float32)

    def __getitem__(self, index: int):
        from detkit.data.io import read_image

        rec = self.records[index]
        image = read_image(rec.file_name)
        target = Target(
            boxes=torch.from_numpy(rec.boxes.copy()),
            labels=torch.from_numpy(rec.labels.copy()),
            difficult=torch.from_numpy(rec.difficult.copy()),
            image_id=rec.image_id,
            geometry=Geometry.identity(int(image.shape[-2]), int(image.shape[-1])),
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def sanitize_boxes(
    boxes: np.ndarray, width: int, height: int, file: str, problems, native_offset: float = 0.0
) -> np.ndarray:
    """Boolean keep-mask over (R, 4) xyxy ``boxes``; clips them in place to the image.

    Zero-size and inverted are judged on the file's own extent (xmax - xmin): in VOC XML
    xmin == xmax is a click without a drag (BCCD has two), although the inclusive-pixel
    convention would call it one pixel wide; ``native_offset`` undoes that +1.

    Inverted boxes (x2 < x1 or y2 < y1) are dropped rather than swapped: a swapped box is a
    guess, and a wrong positive teaches the detector the wrong thing. Boxes sticking out of
    the image are clipped (annotation tools often write the border pixel + 1); boxes that
    have no area left after clipping are dropped. Every case is counted in ``problems``.
    """
    if len(boxes) == 0:
        return np.zeros((0,), bool)
    finite = np.isfinite(boxes).all(axis=1)
    if (~finite).any():
        problems.add("dropped boxes with non-finite coordinates", file, int((~finite).sum()))
    boxes[~finite] = 0
    extent_w = boxes[:, 2] - boxes[:, 0] - native_offset
    extent_h = boxes[:, 3] - boxes[:, 1] - native_offset
    inverted = finite & ((extent_w < 0) | (extent_h < 0))
    if inverted.any():
        problems.add("dropped inverted boxes (max < min)", file, int(inverted.sum()))
    zero = finite & ~inverted & ((extent_w == 0) | (extent_h == 0))
    if zero.any():
        problems.add("dropped zero-area boxes", file, int(zero.sum()))
    ok = finite & ~inverted & ~zero
    if width > 0 and height > 0:
        clipped = boxes.copy()
        np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
        np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
        outside = ok & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        # A box entirely outside is reported once, as dropped, not also as clipped.
        changed = ok & ~outside & (np.abs(clipped - boxes).max(axis=1) > 0)
        if changed.any():
            problems.add("clipped boxes extending outside the image", file, int(changed.sum()))
        if outside.any():
            problems.add("dropped boxes lying outside the image", file, int(outside.sum()))
        boxes[:] = clipped
        ok &= ~outside
    return ok

"""Test-time augmentation by mirroring: the detector also sees each test image flipped, and
the detections of all views are merged into one set per image.

    views = [images] + [images mirrored by f for f in flips]     # f in "h", "v", "hv"
    dets  = [detector(view) for view in views]                   # each in original pixels
    merged per image:
        pool     = all views' detections                         # R boxes, with their view
        kept     = per-class NMS over the pool at nms_iou        # torchvision batched_nms
        box      = score-weighted mean of the pool's same-class boxes with IoU >= vote_iou
        score    = mean over the V views of that view's best same-class score with
                   IoU >= score_iou (0 for a view that has none)
        top max_detections by score

A view mirrors only each image's valid region (the batch padding stays at the bottom and
right, where the backbone expects it) and records the mirror in the image's ``Geometry``,
so the detector's ``map_to_original`` takes every view's boxes back to the same original
pixels and precomputed proposals are mirrored onto the view by ``Geometry.apply``.

Why the two merge steps: box voting (Gidaris & Komodakis 2015, "Object detection via a
multi-region & semantic segmentation-aware CNN model", sec. 4; Detectron's ``TEST.BBOX_VOTE``)
averages the views' estimates of the same object's box instead of keeping the single most
confident one. Averaging the scores over views (the usual test-time augmentation of
classifiers: the mean of the views' probabilities, a view without the object counting 0;
Weighted Boxes Fusion, Solovyev et al. 2021, scores fused boxes the same way) ranks an
object that every view finds above one that a single view finds with the same confidence.
On BCCD validation (README, "BCCD"), NMS alone over four views gained +0.004 VOC mAP, with
voting and score averaging +0.009. ``vote_iou = 0`` / ``score_iou = 0`` switch a step off
(the kept box keeps its own coordinates / score).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Sequence

import torch
from torchvision.ops import batched_nms, box_iou

from detkit.structures import Detections, ImageList

#: The mirrors a view may apply: horizontal, vertical, both.
FLIPS = ("h", "v", "hv")


def mirrored_view(images: ImageList, flip: str) -> ImageList:
    """``images`` with each image's valid (h, w) region mirrored (``flip`` in ``FLIPS``) and
    the mirror recorded in its geometry. The input batch is not changed."""
    if flip not in FLIPS:
        raise ValueError(f"flip: one of {', '.join(FLIPS)}, got {flip!r}")
    dims = [d for d, axis in ((-1, "h"), (-2, "v")) if axis in flip]
    tensor = images.tensor.clone()
    geometries = []
    for i, (h, w) in enumerate(images.image_sizes):
        tensor[i, :, :h, :w] = images.tensor[i, :, :h, :w].flip(dims)
        geometry = images.geometry(i)
        if "h" in flip:
            geometry = geometry.mirrored()
        if "v" in flip:
            geometry = geometry.mirrored_vertically()
        geometries.append(geometry)
    return replace(images, tensor=tensor, geometries=geometries)


def merge_views(
    views: Sequence[Detections],
    nms_iou: float = 0.5,
    vote_iou: float = 0.7,
    score_iou: float = 0.6,
    max_detections: int = 100,
) -> Detections:
    """The detections of one image from V views (same pixels: the original image's) -> one
    set (see the module doc). R_v boxes per view; returns at most ``max_detections``, sorted
    by score, high to low."""
    if not views:
        raise ValueError("merge_views: no views")
    boxes = torch.cat([v.boxes for v in views])  # (R, 4), R = sum of R_v
    scores = torch.cat([v.scores for v in views])
    labels = torch.cat([v.labels for v in views])
    if boxes.shape[0] == 0:
        return Detections(boxes, scores, labels)
    view_of = torch.cat([torch.full((len(v),), i, dtype=torch.int64, device=boxes.device) for i, v in enumerate(views)])
    keep = batched_nms(boxes, scores, labels, nms_iou)  # (K,)
    # (K, R): overlap of each kept box with every pooled box of its class (0 across classes)
    same_class = labels[keep][:, None] == labels[None, :]
    iou = box_iou(boxes[keep], boxes) * same_class
    out_boxes = boxes[keep]
    if vote_iou > 0:
        # the kept box itself has IoU 1, so every row has a positive weight
        weights = (iou >= vote_iou) * scores[None, :]
        out_boxes = (weights @ boxes) / weights.sum(dim=1, keepdim=True)
    out_scores = scores[keep]
    if score_iou > 0:
        matched = torch.where(iou >= score_iou, scores[None, :], torch.zeros_like(iou))
        # (K, V): each view's best matching score; a view with no box of that class scores 0
        best = matched.new_zeros((keep.shape[0], len(views)))
        best.scatter_reduce_(1, view_of[None, :].expand_as(matched), matched, reduce="amax")
        out_scores = best.mean(dim=1)
    order = torch.argsort(out_scores, descending=True, stable=True)[:max_detections]
    return Detections(out_boxes[order], out_scores[order], labels[keep][order])


@dataclass(frozen=True)
class MergeSettings:
    """The arguments of ``merge_views`` after the views (``data.input.test_merge_*``; the
    RoI head's ``detections_per_img``)."""

    nms_iou: float = 0.5
    vote_iou: float = 0.7
    score_iou: float = 0.6
    max_detections: int = 100


def merge_batch(per_view: List[List[Detections]], settings: MergeSettings) -> List[Detections]:
    """per_view[v][i]: view v's detections of image i -> the merged detections per image."""
    return [
        merge_views(
            [view[i] for view in per_view],
            settings.nms_iou,
            settings.vote_iou,
            settings.score_iou,
            settings.max_detections,
        )
        for i in range(len(per_view[0]))
    ]

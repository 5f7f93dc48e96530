"""``RoIHeadBase``: what every region head of the lineage shares, written once.

Shapes: N images, R regions (over the batch, or of one image where said), K foreground
classes.

num_classes is K, the FOREGROUND classes: labels are 1..K and ``BACKGROUND`` = 0
(``detkit.structures``) is never counted in it.

Shared here (the papers agree on these steps; only thresholds differ, and those are passed in):

training targets   ground-truth boxes join the proposals (Fast R-CNN sec. 2.3), every region
                   is labelled by a ``Matcher`` (foreground class of its best GT, background, or
                   ignored), a ``BalancedSampler`` draws the mini-batch, and the foreground
                   regions' box targets are encoded with a ``BoxCoder``;
inference          per-class scores, per-class box decoding, clipping to the image, a score
                   threshold, class-wise NMS and a cap on detections per image (Fast R-CNN
                   sec. 3; R-CNN sec. 2.2 "greedy non-maximum suppression for each class").

A subclass adds its predictor and its loss:

``predict(images, features, boxes)`` -> class outputs (R, K + 1) or (R, K), box deltas
    (R, 4K), (R, 4) or None. It receives the images too: R-CNN warps crops from the image
    itself, not from feature maps.
``losses(class_outputs, deltas, labels, box_targets)`` -> dict of namespaced loss terms.
``class_scores(class_outputs)`` -> (R, K) per-class scores: a softmax without the background
    column for Fast R-CNN, raw per-class scores for R-CNN's linear SVMs.
``class_agnostic``: True when the box regressor predicts one box (4 deltas) for all classes,
    False when it predicts 4 per class; a head without a regressor returns deltas None and
    its detections keep the proposal boxes.

``predict`` / ``losses`` / ``inference`` are separate so that a validation loss can be
computed in eval mode: ``forward`` computes losses whenever targets are given, and
detections whenever the module is in eval mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher, clip_boxes, nonempty, pairwise_iou
from detkit.modeling.pyramid import PyramidLevel, pyramid_predict
from detkit.structures import Detections, ImageList, Proposals, Target


def class_deltas(deltas: Tensor, classes: Tensor, class_agnostic: bool) -> Tensor:
    """deltas (R, 4K) class-specific or (R, 4) agnostic; classes (R,) in 1..K -> (R, 4), the
    deltas of each row's class."""
    if class_agnostic:
        return deltas
    rows = torch.arange(classes.numel(), device=deltas.device)
    return deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)[rows, classes - 1]


class RoIHeadBase(nn.Module, ABC):
    """Base of the region heads (an ``interfaces.RoIHead``); see the module docstring.

    num_classes: K foreground classes (background not counted).
    box_coder: encodes training targets and decodes predicted deltas.
    matcher: labels regions by IoU with the ground truth (1 foreground, 0 background,
        -1 ignored), e.g. Fast R-CNN's fg >= 0.5, bg in [0.1, 0.5).
    sampler: draws the training mini-batch per image (e.g. 64 regions, 25 % foreground).
    add_gt_as_proposals: ground-truth boxes join the proposals in training.
    score_thresh, nms_thresh, detections_per_img, min_box_size: inference (boxes narrower or
        lower than ``min_box_size`` after clipping are dropped).
    """

    def __init__(
        self,
        num_classes: int,
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        add_gt_as_proposals: bool = True,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        min_box_size: float = 1e-2,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.add_gt_as_proposals = bool(add_gt_as_proposals)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.min_box_size = float(min_box_size)

    # -- what a subclass defines ---------------------------------------------------------
    @abstractmethod
    def predict(
        self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """boxes: per image (R_i, 4) in network-input pixels -> class outputs (R, ...) and box
        deltas (R, 4K) / (R, 4) / None for the boxes of all images, in order."""

    @abstractmethod
    def losses(
        self, class_outputs: Tensor, deltas: Optional[Tensor], labels: Tensor, box_targets: Tensor
    ) -> Dict[str, Tensor]:
        """labels (R,) in 0..K (0 = background); box_targets (R, 4) encoded, valid where
        labels > 0."""

    @abstractmethod
    def class_scores(self, class_outputs: Tensor) -> Tensor:
        """class outputs (R, ...) -> (R, K) score of each foreground class (column k - 1 is
        class k); higher is better."""

    @property
    @abstractmethod
    def class_agnostic(self) -> bool:
        """True: one regressed box for all classes ((R, 4) deltas); False: (R, 4K)."""

    # -- training targets ----------------------------------------------------------------
    @torch.no_grad()
    def label_and_sample(self, proposals: List[Tensor], targets: List[Target]) -> Tuple[List[Tensor], Tensor, Tensor]:
        """-> sampled boxes per image, labels (R,) in 0..K, encoded box targets (R, 4).

        Per image the sampled foreground regions come first (labelled with their GT's
        class), then the background ones (0); ignored regions are never sampled."""
        sampled_boxes, labels_out, targets_out = [], [], []
        for boxes, target in zip(proposals, targets):
            gt = target.boxes.to(boxes.device, boxes.dtype)
            gt_labels = target.labels.to(boxes.device)
            if self.add_gt_as_proposals and len(gt):
                boxes = torch.cat([boxes, gt], 0)
            matched, match_labels = self.matcher(pairwise_iou(gt, boxes))
            labels = gt_labels[matched] if len(gt) else torch.zeros_like(matched)
            labels = torch.where(match_labels == 1, labels, torch.zeros_like(labels))
            labels[match_labels == -1] = -1
            sample_labels = torch.where(labels > 0, torch.ones_like(labels), labels)
            pos, neg = self.sampler(sample_labels)
            idx = torch.cat([pos, neg])
            sel = boxes[idx]
            labels = labels[idx]  # positives first (their class), then negatives (0)
            matched_gt = gt[matched[idx]] if len(gt) else torch.zeros_like(sel)
            box_targets = torch.zeros_like(sel)
            if pos.numel():
                box_targets[: pos.numel()] = self.box_coder.encode(matched_gt[: pos.numel()], sel[: pos.numel()])
            sampled_boxes.append(sel)
            labels_out.append(labels)
            targets_out.append(box_targets)
        return sampled_boxes, torch.cat(labels_out), torch.cat(targets_out)

    # -- inference -----------------------------------------------------------------------
    def inference(
        self,
        class_outputs: Tensor,
        deltas: Optional[Tensor],
        proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Detections]:
        """Per image: per-class scores and boxes, clip, threshold, class-wise NMS, top-k.
        Returns one ``Detections`` per image in network-input pixels."""
        k = self.num_classes
        counts = [len(p) for p in proposals]
        ref = torch.cat(proposals, 0) if proposals else class_outputs.new_zeros((0, 4))
        scores_all = self.class_scores(class_outputs.float())
        if deltas is None:  # no regressor: every class keeps the proposal box
            boxes_all = ref.float()
        else:
            boxes_all = self.box_coder.decode(deltas.float(), ref)
        per_region = 4 if deltas is None or self.class_agnostic else 4 * k
        if boxes_all.shape[1] != per_region or scores_all.shape[1] != k:
            raise ValueError(
                f"{type(self).__name__}: expected {per_region} box values and {k} class scores per region, "
                f"got {boxes_all.shape[1]} and {scores_all.shape[1]}"
            )
        # One image needs no split: the exported graph (one image) then keeps the number of
        # regions dynamic instead of the traced image's count.
        box_chunks = (boxes_all,) if len(counts) == 1 else boxes_all.split(counts)
        score_chunks = (scores_all,) if len(counts) == 1 else scores_all.split(counts)
        results = []
        for boxes, scores, size in zip(box_chunks, score_chunks, image_sizes):
            boxes = clip_boxes(boxes.view(-1, boxes.shape[1] // 4, 4), size)
            if boxes.shape[1] == 1:  # one box for every class
                boxes = boxes.expand(-1, k, 4)
            labels = torch.arange(1, k + 1, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = (scores > self.score_thresh) & nonempty(boxes, self.min_box_size)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append(Detections(boxes[keep], scores[keep], labels[keep]))
        return results

    # -- the RoIHead interface -----------------------------------------------------------
    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Proposals],
        targets: Optional[List[Target]] = None,
        pyramid: Optional[Sequence[PyramidLevel]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        """Losses on a sampled mini-batch whenever targets are given (also in eval mode: a
        validation loss); detections on all proposals in eval mode ([] in training).
        ``pyramid``: multi-scale testing (``modeling.pyramid``): in eval mode each proposal is
        predicted at its pyramid level; losses stay at the single scale of ``features``."""
        boxes = [p.boxes for p in proposals]
        assert not any(b.requires_grad for b in boxes), "proposals must be detached before the RoI head"
        losses: Dict[str, Tensor] = {}
        if targets is not None:
            sampled, labels, box_targets = self.label_and_sample(boxes, targets)
            class_outputs, deltas = self.predict(images, features, sampled)
            losses = self.losses(class_outputs, deltas, labels, box_targets)
        detections: List[Detections] = []
        if not self.training:
            if pyramid is None:
                class_outputs, deltas = self.predict(images, features, boxes)
            else:
                class_outputs, deltas = pyramid_predict(self.predict, pyramid, boxes)
            detections = self.inference(class_outputs, deltas, boxes, images.image_sizes)
        return detections, losses

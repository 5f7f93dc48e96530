"""The Fast R-CNN region head (Girshick, ICCV 2015), an RoIHead:
``forward(images, features, proposals, targets=None) -> (detections, losses)``.

Shapes: N images, R regions (over the batch, or of one image where said), K foreground
classes, D box-feature width, S pooled size.

num_classes is K, the FOREGROUND classes: the classifier has K + 1 outputs (index 0 =
background, ``detkit.structures.BACKGROUND``) and the class-specific regressor 4K outputs
(no deltas for background, which never gets a box).

Training (sec. 2.3): ground-truth boxes join the proposals; R RoIs per image are sampled
with 25 % foreground (IoU >= 0.5 with a GT) and the rest background (IoU in [0.1, 0.5));
the multi-task loss is L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v) with smooth-L1,
both normalised by the number of sampled RoIs. Test (sec. 3): softmax scores, per-class
boxes, a score threshold, per-class NMS and a cap on detections per image.

The module splits ``predict`` (raw outputs), ``losses`` and ``inference`` so a validation
loss can be computed in eval mode.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher, clip_boxes, nonempty, pairwise_iou, smooth_l1
from detkit.structures import BACKGROUND, Detections, ImageList, Proposals, Target


class MLPBoxHead(nn.Module):
    """Flatten pooled features and apply fully connected layers + ReLU ("fc6", "fc7").
    Fast R-CNN with VGG-16 uses two 4096-wide layers (with dropout when fine-tuning VGG's
    classifier); torchvision's FPN models two 1024-wide ones."""

    def __init__(self, in_features: int, fc_dims: Sequence[int] = (1024, 1024), dropout: float = 0.0):
        super().__init__()
        self.fc_names = []
        dim = in_features
        for i, width in enumerate(fc_dims):
            name = f"fc{6 + i}"
            self.add_module(name, nn.Linear(dim, width))
            self.fc_names.append(name)
            dim = width
        self.dropout = float(dropout)
        self.out_features = dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for name in self.fc_names:
            x = F.relu(getattr(self, name)(x))
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x


class FastRCNNPredictor(nn.Module):
    """cls_score: D -> K + 1 logits; bbox_pred: D -> 4K class-specific deltas (4 if agnostic)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if class_agnostic else num_classes))
        # Small initial outputs: uniform class scores, near-zero box deltas (the paper's
        # N(0, 0.01) and N(0, 0.001)).
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class FastRCNNHead(nn.Module):
    """pooler: a RoIPooler (or any module ``(features list, boxes list) -> (R, ...)``);
    box_head: maps pooled features to (R, D); predictor: (R, D) -> logits, deltas.
    in_features: names of the backbone outputs to pool from.
    """

    def __init__(
        self,
        pooler: nn.Module,
        box_head: nn.Module,
        predictor: FastRCNNPredictor,
        num_classes: int,
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        in_features: Sequence[str],
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 1.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        min_box_size: float = 1e-2,
    ):
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.num_classes = int(num_classes)
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.in_features = list(in_features)
        self.add_gt_as_proposals = add_gt_as_proposals
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.min_box_size = float(min_box_size)

    # -- the three parts ---------------------------------------------------------------
    def predict(self, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """-> class logits (R, K + 1), deltas (R, 4K) for the boxes of all images, in order."""
        pooled = self.pooler([features[k] for k in self.in_features], boxes)
        return self.predictor(self.box_head(pooled))

    def losses(self, logits: Tensor, deltas: Tensor, labels: Tensor, box_targets: Tensor) -> Dict[str, Tensor]:
        """labels (R,) in 0..K; box_targets (R, 4) encoded, used where labels > 0."""
        logits, deltas = logits.float(), deltas.float()
        loss_cls = F.cross_entropy(logits, labels, reduction="mean") if labels.numel() else logits.sum() * 0
        fg = torch.nonzero(labels > BACKGROUND).squeeze(1)
        if deltas.shape[1] == 4:  # class-agnostic regression
            fg_deltas = deltas[fg]
        else:
            cls = labels[fg] - 1
            fg_deltas = deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)[fg, cls]
        # Normalised by all sampled RoIs, not only foreground (Fast R-CNN's lambda = 1 with
        # this normalisation balances the two terms, sec. 2.3).
        loss_box = smooth_l1(fg_deltas, box_targets[fg], self.smooth_l1_beta) / max(labels.numel(), 1)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def inference(
        self, logits: Tensor, deltas: Tensor, proposals: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Detections]:
        """Per image: softmax, per-class decode, clip, threshold, per-class NMS, top-k."""
        logits, deltas = logits.float(), deltas.float()
        counts = [len(p) for p in proposals]
        ref = torch.cat(proposals, 0) if proposals else deltas.new_zeros((0, 4))
        boxes_all = self.box_coder.decode(deltas, ref)
        scores_all = F.softmax(logits, -1)
        results = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            k = self.num_classes
            boxes = clip_boxes(boxes.view(-1, boxes.shape[1] // 4, 4), size)
            if boxes.shape[1] == 1:  # class-agnostic: same box for every class
                boxes = boxes.expand(-1, k, 4)
            scores = scores[:, BACKGROUND + 1 :]
            labels = torch.arange(1, k + 1, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = (scores > self.score_thresh) & nonempty(boxes, self.min_box_size)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append(Detections(boxes[keep], scores[keep], labels[keep]))
        return results

    # -- training targets ----------------------------------------------------------------
    @torch.no_grad()
    def label_and_sample(self, proposals: List[Tensor], targets: List[Target]) -> Tuple[List[Tensor], Tensor, Tensor]:
        """-> sampled boxes per image, labels (R,) in 0..K, encoded box targets (R, 4)."""
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

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Proposals],
        targets: Optional[List[Target]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        boxes = [p.boxes for p in proposals]
        assert not any(b.requires_grad for b in boxes), "proposals must be detached before the RoI head"
        losses: Dict[str, Tensor] = {}
        if targets is not None:
            sampled, labels, box_targets = self.label_and_sample(boxes, targets)
            logits, deltas = self.predict(features, sampled)
            losses = self.losses(logits, deltas, labels, box_targets)
        detections: List[Detections] = []
        if not self.training:
            logits, deltas = self.predict(features, boxes)
            detections = self.inference(logits, deltas, boxes, images.image_sizes)
        return detections, losses

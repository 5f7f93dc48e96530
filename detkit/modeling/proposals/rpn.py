"""Region Proposal Network (Ren et al., Faster R-CNN, NeurIPS 2015, sec. 3.1), a
ProposalGenerator: ``forward(images, features, targets=None) -> (proposals, losses)``.

Shapes: N images; level l has H_l x W_l locations and A anchors per location;
M = sum_l H_l * W_l * A anchors per image; G ground-truth boxes of an image.

The head slides a 3x3 conv over every level and predicts, per anchor, one objectness logit
(a sigmoid here, equivalent to the paper's two-way softmax) and 4 box deltas. Training
labels come from a Matcher (IoU >= 0.7 positive, < 0.3 negative, plus each GT's best
anchor), 256 anchors per image are sampled up to 1:1, and the losses are binary
cross-entropy and smooth-L1 on the positives, both normalised by the number sampled.
Proposals: per level the pre-NMS top-k by objectness, decode, clip to the image, drop tiny
boxes, NMS at 0.7 (per level), keep the post-NMS top-k per image. Proposals are detached:
the RoI head never back-propagates into box coordinates (Faster R-CNN sec. 3.2, approximate
joint training).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detkit.modeling.box_ops import (
    BalancedSampler,
    BoxCoder,
    Matcher,
    at_most,
    clip_boxes,
    nonempty,
    pairwise_iou,
    smooth_l1,
)
from detkit.modeling.proposals.anchors import AnchorGenerator
from detkit.structures import ImageList, Proposals, Target


class RPNHead(nn.Module):
    """conv3x3 (+ReLU) x ``conv_depth``, then sibling 1x1 convs for A objectness logits and
    4A deltas per location. One head is shared by all FPN levels (FPN paper sec. 4.1)."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        layers = []
        for _ in range(conv_depth):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)  # paper sec. 3.1.3: zero-mean Gaussian, std 0.01
                assert m.bias is not None
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """-> logits [(N, A, H_l, W_l)], deltas [(N, 4A, H_l, W_l)] per level."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten(logits: Tensor, deltas: Tensor) -> Tuple[Tensor, Tensor]:
    """(N, A, H, W), (N, 4A, H, W) -> (N, H*W*A), (N, H*W*A, 4) in the anchors' (y, x, a) order."""
    n, a, h, w = logits.shape
    logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


class RPN(nn.Module):
    """in_features: names of the backbone outputs the RPN looks at (one per anchor level).
    pre_nms_topk / post_nms_topk: (train, test) pairs; pre is per level, post per image.
    allowed_border: training ignores anchors reaching more than this many pixels outside
    the image (Faster R-CNN sec. 3.3 ignores all cross-boundary anchors: 0); -1 keeps all.
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        in_features: Sequence[str],
        pre_nms_topk: Tuple[int, int] = (2000, 1000),
        post_nms_topk: Tuple[int, int] = (2000, 1000),
        nms_thresh: float = 0.7,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        smooth_l1_beta: float = 1.0 / 9,
        allowed_border: float = -1.0,
    ):
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.in_features = list(in_features)
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.score_thresh = float(score_thresh)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.allowed_border = float(allowed_border)

    def forward(
        self, images: ImageList, features: Dict[str, Tensor], targets: Optional[List[Target]] = None
    ) -> Tuple[List[Proposals], Dict[str, Tensor]]:
        feats = [features[k] for k in self.in_features]
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(feats, tuple(images.tensor.shape[-2:]))
        flat = [_flatten(lg, dl) for lg, dl in zip(logits, deltas)]
        level_logits = [f[0] for f in flat]
        level_deltas = [f[1] for f in flat]
        with torch.no_grad():
            proposals = self.select_proposals(anchors, level_logits, level_deltas, images.image_sizes)
        losses = {}
        if targets is not None:
            losses = self.losses(
                torch.cat(anchors), torch.cat(level_logits, 1), torch.cat(level_deltas, 1), targets, images.image_sizes
            )
        return proposals, losses

    def select_proposals(
        self,
        anchors: List[Tensor],
        logits: List[Tensor],
        deltas: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Proposals]:
        """Per level top-k -> decode -> clip -> drop small -> per-level NMS -> top-k per image."""
        pre_k = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        num_images = logits[0].shape[0]
        boxes_per_level, scores_per_level, level_ids = [], [], []
        for level, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = at_most(pre_k, lg, 1)  # a level of a small image may have fewer anchors
            top_logits, idx = lg.detach().float().topk(k, dim=1)
            batch = torch.arange(num_images, device=lg.device)[:, None]
            sel_deltas = dl.detach().float()[batch, idx]  # (N, k, 4); float even under AMP
            sel_anchors = anc[idx]  # (N, k, 4)
            decoded = self.box_coder.decode(sel_deltas.reshape(-1, 4), sel_anchors.reshape(-1, 4))
            boxes_per_level.append(decoded.view(num_images, -1, 4))
            scores_per_level.append(top_logits)
            level_ids.append(torch.full_like(idx[0], level))
        boxes_all = torch.cat(boxes_per_level, 1)
        scores_all = torch.sigmoid(torch.cat(scores_per_level, 1))
        levels = torch.cat(level_ids)
        results = []
        for i, size in enumerate(image_sizes):
            boxes = clip_boxes(boxes_all[i], size)
            scores = scores_all[i]
            keep = nonempty(boxes, self.min_size) & (scores >= self.score_thresh)
            boxes, scores, lv = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, lv, self.nms_thresh)[:post_k]
            results.append(Proposals(boxes[keep], scores[keep]))
        return results

    def label_anchors(
        self, anchors: Tensor, targets: List[Target], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[Tensor, Tensor]:
        """-> labels (N, M) in {1, 0, -1} and matched GT boxes (N, M, 4)."""
        labels, matched_boxes = [], []
        for target, (h, w) in zip(targets, image_sizes):
            gt = target.boxes.to(anchors.device)
            iou = pairwise_iou(gt, anchors)
            outside = None
            if self.allowed_border >= 0:
                b = self.allowed_border
                outside = (
                    (anchors[:, 0] < -b) | (anchors[:, 1] < -b) | (anchors[:, 2] > w + b) | (anchors[:, 3] > h + b)
                )
                # Removed before matching (as py-faster-rcnn does), so a GT near the border
                # gets its best *inside* anchor as the low-quality positive.
                iou[:, outside] = -1.0
            matched, lab = self.matcher(iou)
            lab = lab.to(torch.int64)
            if outside is not None:
                lab[outside] = -1
            labels.append(lab)
            matched_boxes.append(gt[matched] if len(gt) else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched_boxes)

    def losses(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, targets: List[Target], image_sizes
    ) -> Dict[str, Tensor]:
        """anchors (M, 4); logits (N, M); deltas (N, M, 4)."""
        labels, matched_boxes = self.label_anchors(anchors, targets, image_sizes)
        pos_list, neg_list = [], []
        for i in range(labels.shape[0]):
            pos, neg = self.sampler(labels[i])
            pos_list.append(pos + i * labels.shape[1])
            neg_list.append(neg + i * labels.shape[1])
        pos = torch.cat(pos_list)
        sampled = torch.cat([pos] + neg_list)
        flat_logits = logits.reshape(-1).float()
        flat_labels = labels.reshape(-1)
        num_sampled = max(sampled.numel(), 1)
        loss_cls = (
            F.binary_cross_entropy_with_logits(
                flat_logits[sampled], (flat_labels[sampled] == 1).to(flat_logits.dtype), reduction="sum"
            )
            / num_sampled
        )
        flat_anchors = anchors.repeat(labels.shape[0], 1)
        box_targets = self.box_coder.encode(matched_boxes.reshape(-1, 4)[pos], flat_anchors[pos])
        loss_box = smooth_l1(deltas.reshape(-1, 4)[pos].float(), box_targets, self.smooth_l1_beta) / num_sampled
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}

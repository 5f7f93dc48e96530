"""The Fast R-CNN region head (Girshick, ICCV 2015) on the shared ``RoIHeadBase``:
RoI pooling -> fully connected "fc6", "fc7" -> sibling classifier and box regressor.

Shapes: N images, R regions (over the batch, or of one image where said), K foreground
classes, D box-feature width, S pooled size.

num_classes is K, the FOREGROUND classes (background not included): the classifier has
K + 1 outputs (index 0 = background, ``detkit.structures.BACKGROUND``) and the class-specific
regressor 4K outputs (no deltas for background, which never gets a box).

The base (``heads.base``) owns the training targets (GT as proposals, Matcher, sampler, box
encoding; sec. 2.3: 25 % foreground with IoU >= 0.5, background IoU in [0.1, 0.5)) and the
inference steps (per-class decode, clip, threshold, per-class NMS, cap; sec. 3). This module
adds only what is Fast R-CNN's own: the pooler + MLP box head + ``FastRCNNPredictor``,
softmax class scores, and the multi-task loss L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v)
with smooth-L1, both terms normalised by the number of sampled RoIs
(``fast_rcnn_losses``, shared with the Res5 head).

On a single C4 map with two fc layers this is the "C4 + 2fc" head; the ResNet paper's own
C4 head runs res5 per region instead (``heads.res5``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher, smooth_l1
from detkit.modeling.heads.base import RoIHeadBase, class_deltas
from detkit.structures import BACKGROUND, ImageList


class MLPBoxHead(nn.Module):
    """Flatten pooled features and apply fully connected layers + ReLU ("fc6", "fc7").
    Fast R-CNN with VGG-16 uses two 4096-wide layers (with dropout when fine-tuning VGG's
    classifier); torchvision's FPN models two 1024-wide ones."""

    def __init__(self, in_features: int, fc_dims: Sequence[int] = (1024, 1024), dropout: float = 0.0):
        super().__init__()
        self.fc_names: List[str] = []
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
    """cls_score: D -> K + 1 logits; bbox_pred: D -> 4K class-specific deltas (4 if agnostic).
    num_classes: K foreground classes (background not included).

    init: ``gaussian`` (Fast R-CNN sec. 2.2: weights from N(0, 0.01) for the classifier and
    N(0, 0.001) for the regressor, zero biases; detectron2 and mmdetection do the same) or
    ``pytorch`` (``nn.Linear``'s own: weights and biases uniform in +-1/sqrt(D), which is what
    torchvision's FastRCNNPredictor keeps; for same-recipe comparisons)."""

    INITS = ("gaussian", "pytorch")

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False, init: str = "gaussian"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"FastRCNNPredictor init: one of {', '.join(self.INITS)}, got {init!r}")
        self.num_classes = int(num_classes)
        self.class_agnostic = bool(class_agnostic)
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if class_agnostic else num_classes))
        if init == "gaussian":
            # Small initial outputs: uniform class scores, near-zero box deltas.
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.cls_score.bias)
            nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_losses(
    logits: Tensor, deltas: Tensor, labels: Tensor, box_targets: Tensor, smooth_l1_beta: float, class_agnostic: bool
) -> Dict[str, Tensor]:
    """Fast R-CNN's multi-task loss (sec. 2.3), L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v)
    with lambda = 1: cross-entropy over K + 1 classes and smooth-L1 on the foreground rows'
    deltas of their class, both normalised by the number of sampled RoIs.

    logits (R, K + 1); deltas (R, 4K) or (R, 4) when ``class_agnostic``; labels (R,) in 0..K;
    box_targets (R, 4) encoded, used where labels > 0. Keys: loss_cls, loss_box."""
    logits, deltas = logits.float(), deltas.float()
    loss_cls = F.cross_entropy(logits, labels, reduction="mean") if labels.numel() else logits.sum() * 0
    fg = torch.nonzero(labels > BACKGROUND).squeeze(1)
    fg_deltas = class_deltas(deltas[fg], labels[fg], class_agnostic)
    # Normalised by all sampled RoIs, not only foreground (Fast R-CNN's lambda = 1 with
    # this normalisation balances the two terms, sec. 2.3).
    loss_box = smooth_l1(fg_deltas, box_targets[fg], smooth_l1_beta) / max(labels.numel(), 1)
    return {"loss_cls": loss_cls, "loss_box": loss_box}


class FastRCNNHead(RoIHeadBase):
    """The Fast R-CNN head: pooler -> box_head -> predictor (see the module docstring).

    num_classes: K foreground classes, background NOT included (the predictor has K + 1
    class outputs, index 0 = background).
    pooler: a RoIPooler (or any module ``(features list, boxes list) -> (R, ...)``);
    box_head: maps pooled features to (R, D) (``MLPBoxHead``: "fc6", "fc7");
    predictor: (R, D) -> logits (R, K + 1), deltas (R, 4K) or (R, 4) class-agnostic.
    in_features: names of the backbone outputs to pool from.
    smooth_l1_beta: the loss's transition point (1 in the paper, 0 = L1).
    The other arguments are the base's (``heads.base.RoIHeadBase``).
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
        super().__init__(
            num_classes,
            box_coder,
            matcher,
            sampler,
            add_gt_as_proposals=add_gt_as_proposals,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            min_box_size=min_box_size,
        )
        if predictor.num_classes != self.num_classes:
            raise ValueError(f"predictor has {predictor.num_classes} classes, the head {self.num_classes}")
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.in_features = list(in_features)
        self.smooth_l1_beta = float(smooth_l1_beta)

    @property
    def class_agnostic(self) -> bool:
        return self.predictor.class_agnostic

    def predict(
        self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """-> class logits (R, K + 1), deltas (R, 4K) for the boxes of all images, in order."""
        pooled = self.pooler([features[k] for k in self.in_features], boxes)
        return self.predictor(self.box_head(pooled))

    def class_scores(self, class_outputs: Tensor) -> Tensor:
        """Softmax over K + 1 classes, background column dropped (Fast R-CNN sec. 3)."""
        return F.softmax(class_outputs, -1)[:, BACKGROUND + 1 :]

    def losses(
        self, class_outputs: Tensor, deltas: Optional[Tensor], labels: Tensor, box_targets: Tensor
    ) -> Dict[str, Tensor]:
        """labels (R,) in 0..K; box_targets (R, 4) encoded, used where labels > 0."""
        assert deltas is not None, "the Fast R-CNN predictor always regresses boxes"
        return fast_rcnn_losses(class_outputs, deltas, labels, box_targets, self.smooth_l1_beta, self.class_agnostic)

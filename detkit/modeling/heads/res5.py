"""The ResNet paper's C4 region head (He et al., CVPR 2016, appendix A; detectron2's
``Res5ROIHeads``) on the shared ``RoIHeadBase``.

"RoI pooling is performed before conv5_1. On this RoI-pooled feature, all layers of conv5_x
and up are adopted for each region, playing the roles of VGG-16's fc layers" (appendix A):

    C4 (N, C4, H/16, W/16) --RoIAlign S x S--> (R, C4, S, S)          S = 14 (Detectron)
        --res5 (ResNet layer4, first block stride 2)--> (R, C5, S/2, S/2)     ceil for odd S
        --global average pooling--> (R, C5) --FastRCNNPredictor--> (R, K + 1), (R, 4K)

Shapes: N images, R regions, K foreground classes, C4 / C5 channels of ResNet's res4 / res5
(1024 / 2048 for ResNet-50; 256 / 512 for ResNet-18; the tiny backbone's widths[2] / [3]).

num_classes is K, the FOREGROUND classes (background not included): the classifier has
K + 1 outputs (index 0 = background) and the class-specific regressor 4K.

The res5 stage is the same torchvision stage the C4 body came from (``modeling.build`` hands
``layer4`` of that network over), so ImageNet weights initialise it when the backbone has
them; with frozen BatchNorm (the paper: "BN layers are fixed during fine-tuning") it stays
frozen here too. The classifier, loss and inference are Fast R-CNN's (the base's shared
steps, ``fast_rcnn_losses``, softmax scores), as in the paper and in detectron2.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.heads.base import RoIHeadBase
from detkit.modeling.heads.fast_rcnn import FastRCNNPredictor, fast_rcnn_losses
from detkit.structures import BACKGROUND, ImageList


class Res5Head(RoIHeadBase):
    """pooler: a single-level RoIPooler on C4 (14 x 14 RoIAlign in Detectron / detectron2);
    res5: the ResNet stage run per region (its first block has stride 2);
    predictor: (R, C5) -> logits (R, K + 1), deltas (R, 4K) or (R, 4) class-agnostic;
    num_classes: K foreground classes, background NOT included;
    in_features: the one backbone output to pool from (``["c4"]``);
    smooth_l1_beta: the box loss's transition point (0 = L1, detectron2's default).
    The other arguments are the base's (``heads.base.RoIHeadBase``).
    """

    def __init__(
        self,
        pooler: nn.Module,
        res5: nn.Module,
        predictor: FastRCNNPredictor,
        num_classes: int,
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        in_features: Sequence[str],
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 0.0,
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
        if len(in_features) != 1:
            raise ValueError(f"the Res5 head pools from one C4 map, got {list(in_features)}")
        if predictor.num_classes != self.num_classes:
            raise ValueError(f"predictor has {predictor.num_classes} classes, the head {self.num_classes}")
        self.pooler = pooler
        self.res5 = res5
        self.predictor = predictor
        self.in_features = list(in_features)
        self.smooth_l1_beta = float(smooth_l1_beta)

    @property
    def class_agnostic(self) -> bool:
        return self.predictor.class_agnostic

    def region_features(self, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        """-> (R, C5) per-region features: pool S x S from C4, run res5, average over space."""
        pooled = self.pooler([features[k] for k in self.in_features], boxes)
        return self.res5(pooled).mean(dim=(2, 3))

    def predict(
        self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """-> class logits (R, K + 1), deltas (R, 4K) for the boxes of all images, in order."""
        return self.predictor(self.region_features(features, boxes))

    def class_scores(self, class_outputs: Tensor) -> Tensor:
        """Softmax over K + 1 classes, background column dropped."""
        return F.softmax(class_outputs, -1)[:, BACKGROUND + 1 :]

    def losses(
        self, class_outputs: Tensor, deltas: Optional[Tensor], labels: Tensor, box_targets: Tensor
    ) -> Dict[str, Tensor]:
        """Fast R-CNN's multi-task loss (keys loss_cls, loss_box)."""
        assert deltas is not None, "the Res5 head always regresses boxes"
        return fast_rcnn_losses(class_outputs, deltas, labels, box_targets, self.smooth_l1_beta, self.class_agnostic)

"""The one Detector of detkit: backbone -> proposal generator -> RoI head.

R-CNN, SPP-net, Fast R-CNN and Faster R-CNN differ only in which parts they plug in
(``detkit.modeling.build`` does it from a config); this file reads top to bottom:

    features              = backbone(images.tensor)                 # dict name -> (N, C, H, W)
    proposals, rpn_losses = proposal_generator(images, features, targets)
    detections, losses    = roi_head(images, features, proposals, targets)
    detections            -> original image pixels (map_to_original)

The three parts implement ``detkit.modeling.interfaces`` (``Backbone``, ``ProposalGenerator``,
``RoIHead``; checked when the Detector is built). Losses are computed whenever targets are
given, also in eval mode (validation loss); their keys are namespaced by the part
(``loss_rpn_*`` / ``loss_*``) and each term is multiplied by its weight in ``loss_weights``
here and nowhere else.
Targets are in network-input pixels (the data transforms scaled them); ``difficult``
boxes are removed from them before any loss unless ``train_difficult`` is set.

Multi-scale testing (``test_scales``, Fast R-CNN sec. 5.2): in eval mode the backbone also
runs on the input rescaled to each smaller scale (``modeling.pyramid``) and the RoI head
predicts each proposal at its scale; proposals come from the input's own (largest) scale.
Test-time mirroring (``test_flips``, ``modeling.tta``): in eval mode the whole detector also
runs on each mirrored view of the batch and the views' detections are merged per image;
losses (when targets are given) come from the plain view.
Profiling: while ``part_times`` holds a ``PartTimes``, eval-mode forwards add the seconds
spent in the three parts (features, proposals, head) to it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from detkit.modeling.backbones.common import keep_frozen_bn_in_eval
from detkit.modeling.heads.base import RoIHeadBase
from detkit.modeling.interfaces import Backbone, ProposalGenerator, RoIHead, check_implements
from detkit.modeling.pyramid import build_pyramid, pyramid_factors
from detkit.modeling.timing import PartClock, PartTimes
from detkit.modeling.tta import FLIPS, MergeSettings, merge_batch, mirrored_view
from detkit.structures import Detections, ImageList, Target


def map_to_original(detections: List[Detections], images: ImageList) -> List[Detections]:
    """The one place where detections go from network-input pixels back to original pixels
    (each image's ``Geometry.invert``)."""
    if images.geometries is None:
        return detections
    return [
        Detections(geometry.invert(det.boxes), det.scores, det.labels)
        for det, geometry in zip(detections, images.geometries)
    ]


class Detector(nn.Module):
    """backbone, proposal_generator, roi_head: modules implementing the interfaces of the same
    names (TypeError otherwise). loss_weights: loss name -> factor (missing: 1).
    train_difficult: keep difficult boxes in the training targets.
    test_scales: shorter sides of the test-time image pyramid (two or more; the input is at
    the largest); the RoI head must accept ``pyramid=`` (``heads.base.RoIHeadBase`` does).
    test_flips: mirrored views added at test time ("h", "v", "hv"; ``modeling.tta``), merged
    by ``test_merge``.
    channels_last_inference / fold_batchnorm: speed settings (see ``detkit.schema.ModelConfig``);
    a frozen BatchNorm is folded for training by the builder (``modeling.fold``)."""

    def __init__(
        self,
        backbone: Backbone,
        proposal_generator: ProposalGenerator,
        roi_head: RoIHead,
        loss_weights: Optional[Dict[str, float]] = None,
        train_difficult: bool = False,
        channels_last_inference: bool = False,
        test_scales: Sequence[int] = (),
        fold_batchnorm: bool = False,
        test_flips: Sequence[str] = (),
        test_merge: MergeSettings = MergeSettings(),
    ):
        super().__init__()
        check_implements(backbone, Backbone, "backbone")
        check_implements(proposal_generator, ProposalGenerator, "proposal generator")
        check_implements(roi_head, RoIHead, "RoI head")
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_head = roi_head
        self.loss_weights = dict(loss_weights or {})
        self.train_difficult = train_difficult
        # In eval mode the backbone gets channels-last images (faster oneDNN convolutions on
        # the CPU). Training takes the layout the trainer gives it (train.channels_last,
        # ``modeling.layout``).
        self.channels_last_inference = channels_last_inference
        # Read by the inference entry points (``engine.inference.inference_model``), which run
        # a copy with BatchNorm folded into the convolutions (``modeling.fold``).
        self.fold_batchnorm = fold_batchnorm
        # One scale is the plain single-scale path (bit for bit the same detections).
        self.test_factors = pyramid_factors(test_scales) if len(test_scales) > 1 else []
        if self.test_factors and not isinstance(roi_head, RoIHeadBase):
            raise TypeError(f"test_scales: the RoI head {type(roi_head).__name__} does not predict per pyramid level")
        unknown = [f for f in test_flips if f not in FLIPS]
        if unknown:
            raise ValueError(f"test_flips: each one of {', '.join(FLIPS)}, got {unknown[0]!r}")
        self.test_flips = list(test_flips)
        self.test_merge = test_merge
        self.part_times: Optional[PartTimes] = None

    @property
    def size_divisibility(self) -> int:
        """Input batches are padded to a multiple of this (the backbone's)."""
        return int(self.backbone.size_divisibility)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_bn_in_eval(self)
        return self

    def _training_targets(self, targets: Optional[List[Target]], device) -> Optional[List[Target]]:
        """Targets on the model's device, difficult boxes removed unless ``train_difficult``."""
        if targets is None:
            return None
        out = []
        for t in targets:
            t = t.to(device)
            if t.difficult is not None and not self.train_difficult and t.difficult.any():
                keep = ~t.difficult
                t = replace(t, boxes=t.boxes[keep], labels=t.labels[keep], difficult=t.difficult[keep])
            out.append(t)
        return out

    def forward(
        self, images: ImageList, targets: Optional[List[Target]] = None
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        """-> (detections per image in original pixels; [] in training mode), losses."""
        detections, losses = self._forward_view(images, targets)
        if self.training or not self.test_flips:
            return detections, losses
        per_view = [detections]
        for flip in self.test_flips:
            per_view.append(self._forward_view(mirrored_view(images, flip), None, count_images=False)[0])
        return merge_batch(per_view, self.test_merge), losses

    def _forward_view(
        self, images: ImageList, targets: Optional[List[Target]], count_images: bool = True
    ) -> Tuple[List[Detections], Dict[str, Tensor]]:
        """One pass of the three parts over ``images`` (see ``forward``)."""
        targets = self._training_targets(targets, images.tensor.device)
        clock = PartClock(None if self.training else self.part_times, images.tensor.device)
        x = images.tensor
        if self.channels_last_inference and not self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        pyramid = None
        if self.test_factors and not self.training:
            channels_last = self.channels_last_inference
            pyramid = build_pyramid(
                self.backbone, images, features, self.test_factors, self.size_divisibility, channels_last
            )
        clock.lap("features")
        proposals, proposal_losses = self.proposal_generator(images, features, targets)
        proposals = [p.detach() for p in proposals]
        clock.lap("proposals")
        if pyramid is None:
            detections, head_losses = self.roi_head(images, features, proposals, targets)
        else:  # a RoIHeadBase (checked in __init__): it predicts per pyramid level
            head = cast(RoIHeadBase, self.roi_head)
            detections, head_losses = head(images, features, proposals, targets, pyramid=pyramid)
        losses = {**proposal_losses, **head_losses}
        for name in losses:
            if name in self.loss_weights:
                losses[name] = losses[name] * self.loss_weights[name]
        if not self.training:
            detections = map_to_original(detections, images)
        clock.lap("head")
        if clock.times is not None and count_images:  # a mirrored view is the same images again
            clock.times.images += len(images)
        return detections, losses

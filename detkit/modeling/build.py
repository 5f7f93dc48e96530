"""Config -> model, in one place, with one explicit name -> builder table per kind:
``BACKBONES``, ``PROPOSAL_GENERATORS``, ``ROI_HEADS``. Each table is the single source of
its names (the schema's Literal types are tested against them).

Nothing here is filled by import side effects: to add a backbone, add a line to
``BACKBONES``. Every object built here can also be built by hand with keyword arguments
(see the tests), the config is only a convenience.
"""

from __future__ import annotations

import logging
from typing import Optional

from detkit.errors import BackboneError
from detkit.modeling.backbones.fpn import FPN
from detkit.modeling.backbones.resnet import ResNetBody, SingleMap
from detkit.modeling.backbones.tiny import TinyResNetBody
from detkit.modeling.backbones.vgg import VGGBody
from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.detector import Detector
from detkit.modeling.heads.fast_rcnn import FastRCNNHead, FastRCNNPredictor, MLPBoxHead
from detkit.modeling.poolers import RoIPooler
from detkit.modeling.proposals.anchors import AnchorGenerator
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.modeling.proposals.rpn import RPN, RPNHead
from detkit.modeling.proposals.selective_search import SelectiveSearchProposals
from detkit.schema import BackboneConfig, InputConfig, ModelConfig

logger = logging.getLogger("detkit")


# -- model ---------------------------------------------------------------------------------
def _resnet_body(cfg: BackboneConfig, outs):
    return ResNetBody(cfg.name, outs, norm=cfg.norm, frozen_stages=cfg.frozen_stages, pretrained=cfg.pretrained)


def _vgg_body(cfg: BackboneConfig, outs):
    return VGGBody(
        outs, norm="bn" if cfg.norm == "bn" else "none", frozen_stages=cfg.frozen_stages, pretrained=cfg.pretrained
    )


def _tiny_body(cfg: BackboneConfig, outs):
    if cfg.pretrained:
        raise BackboneError("the tiny backbone has no pretrained weights")
    return TinyResNetBody(cfg.tiny_widths, cfg.tiny_blocks, outs, norm=cfg.norm, frozen_stages=cfg.frozen_stages)


BACKBONES = {
    "resnet18": _resnet_body,
    "resnet34": _resnet_body,
    "resnet50": _resnet_body,
    "resnet101": _resnet_body,
    "vgg16": _vgg_body,
    "tiny": _tiny_body,
}


def build_backbone(cfg: BackboneConfig):
    """FPN over c2..c5, or the single stride-16 map c4 (ResNet C4 / VGG conv5_3)."""
    if cfg.fpn:
        body = BACKBONES[cfg.name](cfg, ("c2", "c3", "c4", "c5"))
        return FPN(body, cfg.out_channels, norm=cfg.fpn_norm)
    return SingleMap(BACKBONES[cfg.name](cfg, ("c4",)), size_divisibility=16)


def build_rpn(cfg: ModelConfig, backbone, input_cfg: InputConfig) -> RPN:
    p = cfg.proposals.rpn
    features = list(backbone.out_features)
    anchors = AnchorGenerator(
        cfg.anchors.sizes,
        cfg.anchors.aspect_ratios,
        [backbone.out_strides[f] for f in features],
        offset=cfg.anchors.offset,
        strides_from_input=cfg.anchors.strides_from_input,
    )
    per_location = set(anchors.num_anchors_per_location())
    if len(per_location) != 1:
        raise BackboneError(f"the shared RPN head needs the same number of anchors on every level, got {per_location}")
    return RPN(
        RPNHead(backbone.out_channels, per_location.pop(), p.conv_depth),
        anchors,
        BoxCoder(p.box_weights),
        Matcher([p.bg_iou_thresh, p.fg_iou_thresh], [0, -1, 1], allow_low_quality_matches=True),
        BalancedSampler(p.batch_size_per_image, p.positive_fraction),
        in_features=features,
        pre_nms_topk=(p.pre_nms_topk_train, p.pre_nms_topk_test),
        post_nms_topk=(p.post_nms_topk_train, p.post_nms_topk_test),
        nms_thresh=p.nms_thresh,
        min_size=p.min_size,
        score_thresh=p.score_thresh,
        smooth_l1_beta=p.smooth_l1_beta,
        allowed_border=p.allowed_border,
    )


def build_roi_head(cfg: ModelConfig, backbone, num_classes: int):
    h = cfg.roi_head
    # FPN: pool from P2..P5 (P6 only serves the RPN), FPN paper sec. 4.2.
    features = [f for f in backbone.out_features if f != "p6"] if cfg.backbone.fpn else list(backbone.out_features)
    pooler = RoIPooler(
        h.pooler_resolution,
        [1.0 / backbone.out_strides[f] for f in features],
        kind=h.pooler,
        sampling_ratio=h.sampling_ratio,
        aligned=h.aligned,
        cpu_sparse=h.cpu_sparse_roi_align,
    )
    box_head = MLPBoxHead(backbone.out_channels * h.pooler_resolution**2, h.fc_dims, h.dropout)
    body = getattr(backbone, "body", None)
    fc_state = body.pop_fc_state() if hasattr(body, "pop_fc_state") else None
    if fc_state is not None:
        # VGG-16's ImageNet fc6/fc7 initialise the Fast R-CNN head (Fast R-CNN sec. 2.2) when
        # the head has their shape (7x7x512 conv5 RoIs, two 4096-wide layers).
        shapes = {k: tuple(v.shape) for k, v in box_head.state_dict().items()}
        if shapes == {k: tuple(v.shape) for k, v in fc_state.items()}:
            box_head.load_state_dict(fc_state)
        else:
            logger.info(
                "VGG-16's fc6/fc7 weights not used: the box head has another shape (%s)",
                ", ".join(f"{k} {v}" for k, v in shapes.items() if k.endswith("weight")),
            )
    # Fast R-CNN sec. 2.3: fg IoU >= 0.5, bg in [lo, 0.5), below lo ignored.
    labels = [-1, 0, 1] if h.bg_iou_thresh_lo > 0 else [0, 0, 1]
    return FastRCNNHead(
        pooler,
        box_head,
        FastRCNNPredictor(box_head.out_features, num_classes, h.class_agnostic),
        num_classes,
        BoxCoder(h.box_weights),
        Matcher([h.bg_iou_thresh_lo, h.fg_iou_thresh], labels, allow_low_quality_matches=False),
        BalancedSampler(h.batch_size_per_image, h.positive_fraction),
        in_features=features,
        add_gt_as_proposals=h.add_gt_as_proposals,
        smooth_l1_beta=h.smooth_l1_beta,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        min_box_size=h.min_box_size,
    )


def build_selective_search(cfg: ModelConfig, backbone, input_cfg: InputConfig) -> SelectiveSearchProposals:
    s = cfg.proposals.selective_search
    # SS looks at raw pixels: it undoes the pipeline's normalisation.
    return SelectiveSearchProposals(s.mode, s.max_proposals, s.min_size, input_cfg.pixel_mean, input_cfg.pixel_std)


def build_precomputed(cfg: ModelConfig, backbone, input_cfg: InputConfig) -> PrecomputedProposals:
    p = cfg.proposals.precomputed
    return PrecomputedProposals(p.path, p.max_proposals)


PROPOSAL_GENERATORS = {
    "rpn": build_rpn,
    "selective_search": build_selective_search,
    "precomputed": build_precomputed,
}


def build_proposal_generator(cfg: ModelConfig, backbone, input_cfg: Optional[InputConfig] = None):
    """The ProposalGenerator named by ``cfg.proposals.method``."""
    return PROPOSAL_GENERATORS[cfg.proposals.method](cfg, backbone, input_cfg or InputConfig())


def build_model(cfg: ModelConfig, num_classes: int, input_cfg: Optional[InputConfig] = None) -> Detector:
    """num_classes: foreground classes K. input_cfg: the data pipeline's input settings
    (proposal generators that look at raw pixels need its normalisation); default ImageNet's."""
    backbone = build_backbone(cfg.backbone)
    proposal_generator = build_proposal_generator(cfg, backbone, input_cfg)
    roi_head = build_roi_head(cfg, backbone, num_classes)
    return Detector(
        backbone,
        proposal_generator,
        roi_head,
        cfg.loss_weights,
        cfg.train_difficult,
        channels_last_inference=cfg.channels_last_inference,
    )


def model_summary(model) -> str:
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n_all / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable)"

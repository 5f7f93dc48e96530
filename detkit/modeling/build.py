"""Config -> model, in one place, with one explicit name -> builder table per kind:
``BACKBONES``, ``PROPOSAL_GENERATORS``, ``ROI_HEADS``. Each table is the single source of
its names (the schema's Literal types are tested against them).

Nothing here is filled by import side effects: to add a backbone, add a line to
``BACKBONES``. Every object built here can also be built by hand with keyword arguments
(see the tests), the config is only a convenience.

Parts of the ImageNet network that a region head continues are handed over here, visibly:
a body builder returns the body and a ``HandOver`` (ResNet's / the tiny net's ``layer4`` for
the Res5 head, VGG-16's and AlexNet's fc6/fc7 weights for the Fast R-CNN, R-CNN and SPP-net
heads), and ``build_model`` passes it to the head builder. R-CNN's head runs the whole
network per warped region: for ``roi_head.name: rcnn`` the body goes into the head and the
detector's backbone is the image itself (``ImageInput``). Values the schema accepts but a
part cannot work with (anchor levels that do not match the backbone's maps, frozen stages
beyond the body, a Res5 head on FPN) are ``ConfigError``s naming the key, raised before
anything is built.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from detkit.errors import ConfigError, ExportError
from detkit.modeling.backbones.alexnet import AlexNetBody, alexnet_fc_state, torchvision_alexnet
from detkit.modeling.backbones.common import Body
from detkit.modeling.backbones.fpn import FPN
from detkit.modeling.backbones.image import ImageInput
from detkit.modeling.backbones.resnet import ResNetBody, SingleMap, stage_out_channels, torchvision_resnet
from detkit.modeling.backbones.tiny import TinyResNet, TinyResNetBody
from detkit.modeling.backbones.vgg import VGGBody, torchvision_vgg16, vgg16_fc_state
from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.detector import Detector
from detkit.modeling.fold import fold_frozen_batchnorm
from detkit.modeling.heads.base import RoIHeadBase
from detkit.modeling.heads.compress import compress_layers
from detkit.modeling.heads.fast_rcnn import FastRCNNHead, FastRCNNPredictor, MLPBoxHead
from detkit.modeling.heads.rcnn_svm import ClassicHead, RCNNHead, SPPHead
from detkit.modeling.heads.res5 import Res5Head
from detkit.modeling.interfaces import Backbone, ProposalGenerator
from detkit.modeling.poolers import RoIPooler, SPPPooler, WarpPooler
from detkit.modeling.proposals.anchors import AnchorGenerator
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.modeling.proposals.rpn import RPN, RPNHead
from detkit.modeling.proposals.selective_search import SelectiveSearchProposals
from detkit.modeling.tta import MergeSettings
from detkit.schema import BackboneConfig, InputConfig, ModelConfig

logger = logging.getLogger("detkit")


# -- backbones -----------------------------------------------------------------------------
@dataclass
class HandOver:
    """What a body builder hands to the region head, from the same ImageNet network.

    res5: the ResNet stage after C4 (torchvision's / the tiny net's ``layer4``), for the
        Res5 head; None when the body uses it itself (FPN) or nobody asked for it.
    fc_state: VGG-16's / AlexNet's ImageNet fc6/fc7 weights under ``MLPBoxHead``'s names;
        None without pretrained weights.

    body: the whole conv network, for a head that runs it on every region itself (R-CNN);
        None for the others (the detector's backbone runs it once per image).
    """

    res5: Optional[nn.Module] = None
    fc_state: Optional[Dict[str, Tensor]] = None
    body: Optional[Body] = None


BodyBuilder = Callable[[BackboneConfig, Sequence[str], bool], Tuple[Body, HandOver]]


def _resnet_body(cfg: BackboneConfig, outs: Sequence[str], res5: bool) -> Tuple[Body, HandOver]:
    net = torchvision_resnet(cfg.name, cfg.norm, cfg.pretrained)
    body = ResNetBody(net, outs, frozen_stages=cfg.frozen_stages)
    return body, HandOver(res5=net.layer4 if res5 else None)


def _vgg_body(cfg: BackboneConfig, outs: Sequence[str], res5: bool) -> Tuple[Body, HandOver]:
    net = torchvision_vgg16("bn" if cfg.norm == "bn" else "none", cfg.pretrained)
    body = VGGBody(net, outs, frozen_stages=cfg.frozen_stages)
    return body, HandOver(fc_state=vgg16_fc_state(net) if cfg.pretrained else None)


def _tiny_body(cfg: BackboneConfig, outs: Sequence[str], res5: bool) -> Tuple[Body, HandOver]:
    # Only the stages someone uses are built (a C4 body without a Res5 head has no layer4),
    # which also keeps the random initialisation of the other parts as it was.
    stages = 4 if res5 or "c5" in outs else 3
    net = TinyResNet(cfg.tiny_widths, cfg.tiny_blocks, norm=cfg.norm, num_stages=stages)
    body = TinyResNetBody(net, outs, frozen_stages=cfg.frozen_stages)
    return body, HandOver(res5=net.layer4 if res5 else None)


def _alexnet_body(cfg: BackboneConfig, outs: Sequence[str], res5: bool) -> Tuple[Body, HandOver]:
    net = torchvision_alexnet(cfg.pretrained)
    body = AlexNetBody(net, cfg.norm, frozen_stages=cfg.frozen_stages)
    return body, HandOver(fc_state=alexnet_fc_state(net) if cfg.pretrained else None)


BACKBONES: Dict[str, BodyBuilder] = {
    "resnet18": _resnet_body,
    "resnet34": _resnet_body,
    "resnet50": _resnet_body,
    "resnet101": _resnet_body,
    "vgg16": _vgg_body,
    "tiny": _tiny_body,
    "alexnet": _alexnet_body,
}
# Backbones whose stage after C4 is a residual stage a Res5 head can run per region.
RES5_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")

FPN_INPUTS = ("c2", "c3", "c4", "c5")
SINGLE_MAP = ("c4",)


def build_backbone(cfg: BackboneConfig, res5: bool = False) -> Tuple[Backbone, HandOver]:
    """FPN over c2..c5, or the single stride-16 map c4 (ResNet C4 / VGG conv5_3); with
    ``res5`` the body builder also hands over the stage after C4 (for the Res5 head)."""
    check_backbone_config(cfg)
    if cfg.fpn:
        body, hand_over = BACKBONES[cfg.name](cfg, FPN_INPUTS, res5)
        return FPN(body, cfg.out_channels, norm=cfg.fpn_norm), hand_over
    body, hand_over = BACKBONES[cfg.name](cfg, SINGLE_MAP, res5)
    return SingleMap(body, size_divisibility=16), hand_over


def build_crop_network(cfg: BackboneConfig) -> Tuple[Body, HandOver]:
    """R-CNN's network: the body of ``cfg`` with its single map (conv5 / C4), to run on
    warped regions inside the head; the hand-over carries it as ``body``."""
    check_backbone_config(cfg)
    body, hand_over = BACKBONES[cfg.name](cfg, SINGLE_MAP, False)
    hand_over.body = body
    return body, hand_over


def backbone_outputs(cfg: BackboneConfig) -> List[str]:
    """The names of the maps the configured backbone gives, without building it."""
    if cfg.fpn:
        return [f"p{name[1:]}" for name in FPN_INPUTS] + ["p6"]  # FPN's P6 (top block)
    return list(SINGLE_MAP)


def check_backbone_config(cfg: BackboneConfig) -> None:
    """The backbone values that need to know the body (the rest is checked by the schema)."""
    if cfg.name == "vgg16":
        top, what = 5, "conv blocks 1..k"
    elif cfg.name == "alexnet":
        top, what = 5, "conv1..convk"
        if cfg.fpn:
            raise ConfigError("model.backbone.fpn: alexnet gives one map (conv5, stride 16); set fpn: false")
        if cfg.pretrained and cfg.norm != "none":
            raise ConfigError(
                f"model.backbone.pretrained: AlexNet's ImageNet weights have no normalisation layers: use "
                f"norm: none with them, or norm: {cfg.norm} from scratch (pretrained: null)"
            )
    else:  # the stem + layer1..3 (C4) or layer1..4 (FPN)
        top, what = 1 + (len(FPN_INPUTS) if cfg.fpn else 3), "the stem and layer1..layer(k-1)"
    # Checked here, not in the schema: a checkpoint's stored config may name weights that
    # loading the checkpoint never fetches (it builds with pretrained: null).
    if cfg.name == "tiny" and cfg.pretrained:
        raise ConfigError("model.backbone.pretrained: the tiny backbone has no pretrained weights (set it to null)")
    if not 0 <= cfg.frozen_stages <= top:
        layout = "FPN" if cfg.fpn else "C4"
        raise ConfigError(
            f"model.backbone.frozen_stages: {cfg.frozen_stages} is out of range for {cfg.name} {layout} "
            f"(0..{top}; k freezes {what})"
        )


# -- proposal generators -------------------------------------------------------------------
def build_rpn(cfg: ModelConfig, backbone: Backbone, input_cfg: InputConfig) -> RPN:
    p = cfg.proposals.rpn
    features = list(backbone.out_features)
    anchors = AnchorGenerator(
        cfg.anchors.sizes,
        cfg.anchors.aspect_ratios,
        [backbone.out_strides[f] for f in features],
        offset=cfg.anchors.offset,
        strides_from_input=cfg.anchors.strides_from_input,
    )
    (per_location,) = set(anchors.num_anchors_per_location())  # checked by check_anchor_config
    return RPN(
        RPNHead(backbone.out_channels, per_location, p.conv_depth),
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


def check_anchor_config(cfg: ModelConfig, maps: Sequence[str]) -> None:
    """One list of anchor sizes / ratios per feature map (or one list for all), and the same
    number of anchors per location on every level (one RPN head is shared by the levels).
    maps: the names of the backbone's outputs the RPN looks at."""
    described = f"{len(maps)} feature map{'s' if len(maps) > 1 else ''} ({', '.join(maps)})"
    for key, levels in (("sizes", cfg.anchors.sizes), ("aspect_ratios", cfg.anchors.aspect_ratios)):
        if len(levels) not in (1, len(maps)):
            raise ConfigError(
                f"model.anchors.{key}: {len(levels)} levels, but the backbone ({cfg.backbone.name}, fpn: "
                f"{str(cfg.backbone.fpn).lower()}) gives {described}: one list per map, or one list for all"
            )
    sizes = cfg.anchors.sizes * (len(maps) if len(cfg.anchors.sizes) == 1 else 1)
    ratios = cfg.anchors.aspect_ratios * (len(maps) if len(cfg.anchors.aspect_ratios) == 1 else 1)
    counts = [len(s) * len(r) for s, r in zip(sizes, ratios)]
    if len(set(counts)) != 1:
        raise ConfigError(
            f"model.anchors.sizes / aspect_ratios: the shared RPN head needs the same number of anchors on "
            f"every level, got {counts} (sizes x ratios per level)"
        )


def build_selective_search(cfg: ModelConfig, backbone: Backbone, input_cfg: InputConfig) -> SelectiveSearchProposals:
    s = cfg.proposals.selective_search
    # SS looks at raw pixels: it undoes the pipeline's normalisation.
    return SelectiveSearchProposals(s.mode, s.max_proposals, s.min_size, input_cfg.pixel_mean, input_cfg.pixel_std)


def build_precomputed(cfg: ModelConfig, backbone: Backbone, input_cfg: InputConfig) -> PrecomputedProposals:
    p = cfg.proposals.precomputed
    if p.path is None:  # the schema requires it for method precomputed
        raise ConfigError("model.proposals.precomputed.path: needed for method precomputed")
    return PrecomputedProposals(p.path, p.max_proposals)


PROPOSAL_GENERATORS: Dict[str, Callable[[ModelConfig, Backbone, InputConfig], ProposalGenerator]] = {
    "rpn": build_rpn,
    "selective_search": build_selective_search,
    "precomputed": build_precomputed,
}


def build_proposal_generator(
    cfg: ModelConfig, backbone: Backbone, input_cfg: Optional[InputConfig] = None
) -> ProposalGenerator:
    """The ProposalGenerator named by ``cfg.proposals.method``."""
    if cfg.proposals.method == "rpn":
        check_anchor_config(cfg, backbone.out_features)
    return PROPOSAL_GENERATORS[cfg.proposals.method](cfg, backbone, input_cfg or InputConfig())


# -- RoI heads -----------------------------------------------------------------------------
def _pooled_features(cfg: ModelConfig, backbone: Backbone) -> List[str]:
    # FPN: pool from P2..P5 (P6 only serves the RPN), FPN paper sec. 4.2.
    return [f for f in backbone.out_features if f != "p6"] if cfg.backbone.fpn else list(backbone.out_features)


def _pooler(cfg: ModelConfig, backbone: Backbone, features: List[str]) -> RoIPooler:
    h = cfg.roi_head
    strides = [backbone.out_strides[f] for f in features]
    levels = [math.log2(s) for s in strides]
    if any(lv != int(lv) for lv in levels) or levels != list(range(int(levels[0]), int(levels[0]) + len(levels))):
        raise ConfigError(
            f"model.backbone: the RoI pooler needs feature strides that are consecutive powers of 2, "
            f"{cfg.backbone.name} gives {dict(zip(features, strides))}"
        )
    return RoIPooler(
        h.pooler_resolution,
        [1.0 / s for s in strides],
        kind=h.pooler,
        sampling_ratio=h.sampling_ratio,
        aligned=h.aligned,
        cpu_sparse=h.cpu_sparse_roi_align,
    )


def _roi_matcher(cfg: ModelConfig) -> Matcher:
    h = cfg.roi_head
    # Fast R-CNN sec. 2.3: fg IoU >= 0.5, bg in [lo, 0.5), below lo ignored.
    labels = [-1, 0, 1] if h.bg_iou_thresh_lo > 0 else [0, 0, 1]
    return Matcher([h.bg_iou_thresh_lo, h.fg_iou_thresh], labels, allow_low_quality_matches=False)


def _load_fc_state(box_head: nn.Module, hand_over: HandOver, network: str) -> None:
    """The ImageNet fc6/fc7 of the backbone network into ``box_head`` when they have its shape."""
    if hand_over.fc_state is None:
        return
    shapes = {k: tuple(v.shape) for k, v in box_head.state_dict().items()}
    if shapes == {k: tuple(v.shape) for k, v in hand_over.fc_state.items()}:
        box_head.load_state_dict(hand_over.fc_state)
    else:
        logger.info(
            "%s's fc6/fc7 weights not used: the box head has another shape (%s)",
            {"vgg16": "VGG-16", "alexnet": "AlexNet"}.get(network, network),
            ", ".join(f"{k} {v}" for k, v in shapes.items() if k.endswith("weight")),
        )


def build_fast_rcnn_head(cfg: ModelConfig, backbone: Backbone, num_classes: int, hand_over: HandOver) -> FastRCNNHead:
    """Pooler + MLP box head ("fc6", "fc7") + FastRCNNPredictor. On a single C4 map this is
    the "C4 + 2fc" head (not the ResNet paper's, which is ``res5``)."""
    h = cfg.roi_head
    features = _pooled_features(cfg, backbone)
    pooler = _pooler(cfg, backbone, features)
    box_head = MLPBoxHead(backbone.out_channels * h.pooler_resolution**2, h.fc_dims, h.dropout)
    # VGG-16's ImageNet fc6/fc7 initialise the Fast R-CNN head (Fast R-CNN sec. 2.2) when the
    # head has their shape (7x7x512 conv5 RoIs, two 4096-wide layers).
    _load_fc_state(box_head, hand_over, cfg.backbone.name)
    apply_svd(cfg, box_head, from_weights=hand_over.fc_state is not None)
    return FastRCNNHead(
        pooler,
        box_head,
        FastRCNNPredictor(box_head.out_features, num_classes, h.class_agnostic, h.predictor_init),
        num_classes,
        BoxCoder(h.box_weights),
        _roi_matcher(cfg),
        BalancedSampler(h.batch_size_per_image, h.positive_fraction),
        in_features=features,
        add_gt_as_proposals=h.add_gt_as_proposals,
        smooth_l1_beta=h.smooth_l1_beta,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        min_box_size=h.min_box_size,
    )


def apply_svd(cfg: ModelConfig, box_head: nn.Module, from_weights: bool = False) -> None:
    """``model.roi_head.svd`` ({"fc6": 1024, "fc7": 256}): the box head's named fully
    connected layers become truncated-SVD pairs (Fast R-CNN sec. 3.1, ``heads.compress``).
    from_weights: factorise the layers' current weights (ImageNet fc6/fc7 handed over);
    otherwise only the structure is built, for loading a compressed checkpoint. Every head
    builder with fc layers calls this on its box head."""
    if not cfg.roi_head.svd:
        return
    try:
        compress_layers(box_head, cfg.roi_head.svd, from_weights=from_weights)
    except ExportError as exc:
        raise ConfigError(f"model.roi_head.svd: {exc}") from None


def build_res5_head(cfg: ModelConfig, backbone: Backbone, num_classes: int, hand_over: HandOver) -> Res5Head:
    """RoIAlign S x S on C4 -> res5 per region -> average pooling -> FastRCNNPredictor (the
    ResNet paper's C4 head); res5 is the backbone network's own layer4."""
    h = cfg.roi_head
    if hand_over.res5 is None:
        raise ConfigError(f"model.roi_head.name: res5 got no res5 stage from the {cfg.backbone.name} backbone")
    features = _pooled_features(cfg, backbone)
    res5 = hand_over.res5
    return Res5Head(
        _pooler(cfg, backbone, features),
        res5,
        FastRCNNPredictor(stage_out_channels(res5), num_classes, h.class_agnostic, h.predictor_init),
        num_classes,
        BoxCoder(h.box_weights),
        _roi_matcher(cfg),
        BalancedSampler(h.batch_size_per_image, h.positive_fraction),
        in_features=features,
        add_gt_as_proposals=h.add_gt_as_proposals,
        smooth_l1_beta=h.smooth_l1_beta,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        min_box_size=h.min_box_size,
    )


def _classic_head_args(cfg: ModelConfig) -> dict:
    """The keyword arguments R-CNN's and SPP-net's heads share (``ClassicHead``)."""
    h = cfg.roi_head
    return dict(
        matcher=_roi_matcher(cfg),
        sampler=BalancedSampler(h.batch_size_per_image, h.positive_fraction),
        svm_features=h.svm.features,
        topk_per_class=h.svm.topk_per_class,
        region_batch=h.region_batch,
        add_gt_as_proposals=h.add_gt_as_proposals,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        min_box_size=h.min_box_size,
    )


def build_rcnn_head(cfg: ModelConfig, backbone: Backbone, num_classes: int, hand_over: HandOver) -> RCNNHead:
    """Warp (``WarpPooler``) -> the network's conv layers (the hand-over's ``body``) ->
    conv5 max-pooled to pooler_resolution (pool5) -> fc6 / fc7 -> (K + 1)-way classifier, SVMs,
    box regressors (R-CNN sec. 2.1-2.3); AlexNet's ImageNet fc6 / fc7 when they fit."""
    h = cfg.roi_head
    body = hand_over.body
    if body is None:  # build_model hands it over; a hand-made call may not
        body = build_crop_network(cfg.backbone)[0]
    (name,) = body.out_features
    pool5_dim = body.out_channels_per_feature[name] * h.pooler_resolution**2
    box_head = MLPBoxHead(pool5_dim, h.fc_dims, h.dropout)
    _load_fc_state(box_head, hand_over, cfg.backbone.name)
    apply_svd(cfg, box_head, from_weights=hand_over.fc_state is not None)
    return RCNNHead(
        WarpPooler(h.warp_size, h.warp_context),
        body,
        box_head,
        num_classes,
        pool_size=h.pooler_resolution,
        **_classic_head_args(cfg),
    )


def build_spp_head(cfg: ModelConfig, backbone: Backbone, num_classes: int, hand_over: HandOver) -> SPPHead:
    """SPP pooler {6, 3, 2, 1} on the backbone's conv5 -> fc6 / fc7 -> (K + 1)-way classifier,
    SVMs, box regressors (SPP-net sec. 4.1-4.2)."""
    h = cfg.roi_head
    (feature,) = _pooled_features(cfg, backbone)  # check_roi_head_config: one map
    pooler = SPPPooler(h.spp_levels, stride=backbone.out_strides[feature])
    box_head = MLPBoxHead(backbone.out_channels * pooler.num_bins, h.fc_dims, h.dropout)
    _load_fc_state(box_head, hand_over, cfg.backbone.name)
    apply_svd(cfg, box_head, from_weights=hand_over.fc_state is not None)
    return SPPHead(pooler, feature, backbone.out_channels, box_head, num_classes, **_classic_head_args(cfg))


ROI_HEADS: Dict[str, Callable[[ModelConfig, Backbone, int, HandOver], RoIHeadBase]] = {
    "fast_rcnn": build_fast_rcnn_head,
    "res5": build_res5_head,
    "rcnn": build_rcnn_head,
    "spp": build_spp_head,
}
# The heads fine-tuned and then given SVMs and box regressors by the offline stages.
CLASSIC_HEADS = ("rcnn", "spp")


def is_classic_head(head: nn.Module) -> bool:
    """Whether the offline stages (feature cache, SVMs, box regression) apply to ``head``."""
    return isinstance(head, ClassicHead)


def check_roi_head_config(cfg: ModelConfig) -> None:
    if cfg.roi_head.svd and cfg.roi_head.name == "res5":
        raise ConfigError("model.roi_head.svd: the res5 head has no fully connected layers to factorise")
    if cfg.roi_head.name == "res5" and (cfg.backbone.fpn or cfg.backbone.name not in RES5_BACKBONES):
        raise ConfigError(
            f"model.roi_head.name: res5 runs the ResNet stage after C4 per region: it needs a ResNet or tiny "
            f"backbone with the single C4 map (model.backbone.fpn: false), got {cfg.backbone.name} with "
            f"fpn: {str(cfg.backbone.fpn).lower()}"
        )
    if cfg.roi_head.name in CLASSIC_HEADS and cfg.backbone.fpn:
        raise ConfigError(
            f"model.roi_head.name: {cfg.roi_head.name} pools one conv5 map (R-CNN / SPP-net have no FPN): set "
            "model.backbone.fpn: false"
        )


def build_roi_head(
    cfg: ModelConfig, backbone: Backbone, num_classes: int, hand_over: Union[HandOver, None] = None
) -> RoIHeadBase:
    """The RoI head named by ``cfg.roi_head.name``; num_classes: K foreground classes."""
    check_roi_head_config(cfg)
    return ROI_HEADS[cfg.roi_head.name](cfg, backbone, num_classes, hand_over or HandOver())


# -- the detector --------------------------------------------------------------------------
def check_model_config(cfg: ModelConfig) -> None:
    """ConfigError naming the key for values the schema accepts but the model's parts cannot
    work with; cheap (nothing is built, no weights are loaded), so callers can check first."""
    check_backbone_config(cfg.backbone)
    if cfg.proposals.method == "rpn":
        check_anchor_config(cfg, backbone_outputs(cfg.backbone))
    check_roi_head_config(cfg)


def build_model(cfg: ModelConfig, num_classes: int, input_cfg: Optional[InputConfig] = None) -> Detector:
    """num_classes: foreground classes K. input_cfg: the data pipeline's input settings
    (proposal generators that look at raw pixels need its normalisation); default ImageNet's."""
    check_model_config(cfg)
    if cfg.roi_head.name == "rcnn":
        # R-CNN runs the network on every warped region inside the head; the detector's
        # backbone is the image itself (an RPN, if configured, then looks at raw pixels: RPN
        # proposals for R-CNN come from a trained detector's file, `detkit proposals --method rpn`).
        _, hand_over = build_crop_network(cfg.backbone)
        backbone: Backbone = ImageInput()
    else:
        backbone, hand_over = build_backbone(cfg.backbone, res5=cfg.roi_head.name == "res5")
    proposal_generator = build_proposal_generator(cfg, backbone, input_cfg)
    roi_head = build_roi_head(cfg, backbone, num_classes, hand_over)
    # Multi-scale testing: every head here is a RoIHeadBase, which predicts per pyramid level.
    test_scales = list(input_cfg.test_scales) if input_cfg is not None else []
    detector = Detector(
        backbone,
        proposal_generator,
        roi_head,
        cfg.loss_weights,
        cfg.train_difficult,
        channels_last_inference=cfg.channels_last_inference,
        fold_batchnorm=cfg.fold_batchnorm,
        test_scales=test_scales,
        test_flips=list(input_cfg.test_flips) if input_cfg is not None else [],
        test_merge=MergeSettings(
            input_cfg.test_merge_nms,
            input_cfg.test_merge_vote_iou,
            input_cfg.test_merge_score_iou,
            cfg.roi_head.detections_per_img,
        )
        if input_cfg is not None
        else MergeSettings(max_detections=cfg.roi_head.detections_per_img),
    )
    if cfg.fold_batchnorm:  # frozen BatchNorm rides in the conv before it (training too)
        fold_frozen_batchnorm(detector)
    return detector


def model_summary(model: nn.Module) -> str:
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n_all / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable)"

"""torchvision's ``FasterRCNN`` built with the settings of a detkit config: the baseline of
the side-by-side benchmarks (tools/benchmark.py) and trainings (tools/train_torchvision.py,
tools/parity_suite.py). Benchmark code, so it lives in tools/, not in the library.
"""

from __future__ import annotations

from typing import List

from detkit.modeling.backbones.common import freeze, norm_layer
from detkit.modeling.backbones.tiny import TinyResNet, TinyResNetBody
from detkit.schema import Config

# Values torchvision's FasterRCNN hard-codes (torchvision 0.29: rpn.py, roi_heads.py,
# _utils.py, anchor_utils.py, transform.py).
TORCHVISION_SMOOTH_L1_BETA = 1.0 / 9
TORCHVISION_RPN_MIN_SIZE = 1e-3
TORCHVISION_DETECTION_MIN_SIZE = 1e-2


class UnsupportedByTorchvision(ValueError):
    """A detkit setting torchvision's FasterRCNN cannot express."""


def build_torchvision_model(cfg: Config, num_classes: int):
    """torchvision's ``FasterRCNN`` built with the same backbone, anchors, sizes and head
    settings as a detkit config, for side-by-side training and timing (tools/benchmark.py,
    tools/train_torchvision.py). ``num_classes`` is K (foreground). Module names follow
    torchvision, so ``map_torchvision_state`` turns its weights into detkit's.

    What torchvision fixes and detkit makes configurable (so comparisons should keep detkit
    at these values): RPN min box size 1e-3, smooth-L1 beta 1/9 in both heads, background
    IoU lower bound 0, no cross-boundary anchor filtering, the scale clamp log(1000/16).
    """
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVPredictor
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    m, b = cfg.model, cfg.model.backbone
    if not b.fpn or not (b.name.startswith("resnet") or b.name == "tiny"):
        raise UnsupportedByTorchvision("torchvision's FasterRCNN comparison supports ResNet-FPN backbones only")
    if m.roi_head.name != "fast_rcnn":
        raise UnsupportedByTorchvision(
            "torchvision's FasterRCNN has the Fast R-CNN box head only (roi_head.name fast_rcnn)"
        )
    if m.roi_head.pooler != "roi_align" or len(set(m.roi_head.fc_dims)) != 1 or len(m.roi_head.fc_dims) != 2:
        raise UnsupportedByTorchvision("torchvision's box head is RoIAlign + two equal fc layers")
    if m.roi_head.bg_iou_thresh_lo != 0.0:
        raise UnsupportedByTorchvision("torchvision samples background from IoU [0, 0.5) only")
    if b.pretrained:
        raise UnsupportedByTorchvision("load pretrained weights into both models yourself")
    if b.name == "tiny":
        # detkit's tiny ResNet is a plain stack of torchvision BasicBlocks (stem, layer1..4),
        # no detection logic: torchvision's FPN, RPN and RoI heads sit on top of the same body.
        net = TinyResNet(b.tiny_widths, b.tiny_blocks, norm=b.norm)
        body = TinyResNetBody(net, frozen_stages=b.frozen_stages)
        channels = [body.out_channels_per_feature[f"c{i}"] for i in range(2, 6)]
    else:
        body = getattr(torchvision.models, b.name)(weights=None, norm_layer=norm_layer(b.norm))
        if b.frozen_stages >= 1:
            freeze([body.conv1, body.bn1])
        for i in range(1, b.frozen_stages):
            freeze([getattr(body, f"layer{i}")])
        channels = [
            getattr(body, f"layer{i}")[-1].conv3.out_channels
            if hasattr(getattr(body, f"layer{i}")[-1], "conv3")
            else getattr(body, f"layer{i}")[-1].conv2.out_channels
            for i in range(1, 5)
        ]
    fpn_norm = norm_layer(b.fpn_norm) if b.fpn_norm and b.fpn_norm != "none" else None
    backbone = BackboneWithFPN(
        body,
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        channels,
        b.out_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=fpn_norm,
    )
    sizes = [tuple(s) for s in m.anchors.sizes]
    ratios = [tuple(r) for r in m.anchors.aspect_ratios]
    if len(ratios) == 1:
        ratios = ratios * len(sizes)
    anchors = TVAnchorGenerator(tuple(sizes), tuple(ratios))
    r, h, inp = m.proposals.rpn, m.roi_head, cfg.data.input
    res = h.pooler_resolution
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(inp.min_size_train),
        max_size=inp.max_size,
        image_mean=list(inp.pixel_mean),
        image_std=list(inp.pixel_std),
        rpn_anchor_generator=anchors,
        rpn_head=TVRPNHead(b.out_channels, anchors.num_anchors_per_location()[0], conv_depth=r.conv_depth),
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train,
        rpn_pre_nms_top_n_test=r.pre_nms_topk_test,
        rpn_post_nms_top_n_train=r.post_nms_topk_train,
        rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_nms_thresh=r.nms_thresh,
        rpn_fg_iou_thresh=r.fg_iou_thresh,
        rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image,
        rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=res, sampling_ratio=h.sampling_ratio),
        box_head=TwoMLPHead(b.out_channels * res * res, h.fc_dims[0]),
        box_predictor=TVPredictor(h.fc_dims[0], num_classes + 1),
        box_score_thresh=h.score_thresh,
        box_nms_thresh=h.nms_thresh,
        box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh,
        box_bg_iou_thresh=h.fg_iou_thresh,
        box_batch_size_per_image=h.batch_size_per_image,
        box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.box_weights),
    )
    # torchvision tests at min_size[-1]; detkit has its own test size.
    model._detkit_min_size_train = tuple(inp.min_size_train)
    model._detkit_min_size_test = (inp.min_size_test,)
    return model


def recipe_deviations(cfg: Config) -> List[str]:
    """The settings of ``cfg`` that torchvision's FasterRCNN cannot follow (it hard-codes
    them), one readable line each; [] when torchvision trains exactly the config's recipe.
    ``build_torchvision_model`` refuses structural differences; these it builds anyway, so
    a comparison must report them (tools/train_torchvision.py writes them to eval.json)."""
    m, r, h = cfg.model, cfg.model.proposals.rpn, cfg.model.roi_head
    out = []

    def differs(a: float, b: float) -> bool:
        return abs(a - b) > 1e-6 * max(abs(a), abs(b), 1.0)

    if differs(h.smooth_l1_beta, TORCHVISION_SMOOTH_L1_BETA):
        out.append(f"box-head smooth-L1 beta: detkit {h.smooth_l1_beta:g}, torchvision 1/9 (fixed)")
    if differs(r.smooth_l1_beta, TORCHVISION_SMOOTH_L1_BETA):
        out.append(f"RPN smooth-L1 beta: detkit {r.smooth_l1_beta:g}, torchvision 1/9 (fixed)")
    if differs(r.min_size, TORCHVISION_RPN_MIN_SIZE):
        out.append(f"RPN proposal min size: detkit {r.min_size:g} px, torchvision 1e-3 (fixed)")
    if list(r.box_weights) != [1.0, 1.0, 1.0, 1.0]:
        out.append(f"RPN box weights: detkit {list(r.box_weights)}, torchvision (1, 1, 1, 1) (fixed)")
    if r.allowed_border >= 0:
        out.append(f"RPN allowed_border: detkit {r.allowed_border:g} px, torchvision keeps every anchor")
    if differs(h.min_box_size, TORCHVISION_DETECTION_MIN_SIZE):
        out.append(f"detection min size: detkit {h.min_box_size:g} px, torchvision 1e-2 (fixed)")
    if h.aligned:
        out.append("RoIAlign aligned: detkit true, torchvision false (fixed)")
    if h.dropout:
        out.append(f"box-head dropout: detkit {h.dropout:g}, torchvision none")
    if h.class_agnostic:
        out.append("class-agnostic box regression: detkit yes, torchvision per class")
    if h.predictor_init != "pytorch":
        out.append(
            f"box predictor init: detkit {h.predictor_init} (Fast R-CNN's N(0, 0.01) / N(0, 0.001)), torchvision "
            "nn.Linear's uniform default; model.roi_head.predictor_init=pytorch follows torchvision"
        )
    if not h.add_gt_as_proposals:
        out.append("ground truth as proposals: detkit no, torchvision always")
    if cfg.data.input.test_flips:
        flips = ", ".join(cfg.data.input.test_flips)
        out.append(f"test-time mirroring: detkit the image and {flips} merged, torchvision the image alone")
    weights = {k: v for k, v in m.loss_weights.items() if v != 1.0}
    if weights:
        out.append(f"loss weights: detkit {weights}, torchvision all 1")
    if m.anchors.offset:
        out.append(f"anchor offset: detkit {m.anchors.offset:g}, torchvision 0")
    if not m.anchors.strides_from_input:
        # P6 = max-pool(P5, stride 2) has ceil(H / 64) rows: a 160-px input gets 3 rows and
        # torchvision's stride 160 // 3 = 53 instead of 64 (P2..P5 agree).
        out.append(
            "P6 anchor stride: detkit 64, torchvision padded input size // P6 size (53 for a 160-px input); "
            "model.anchors.strides_from_input=true follows torchvision"
        )
    return out


def set_torchvision_mode(model, train: bool):
    """model.train()/eval() plus the resize size detkit would use in that mode."""
    model.train(train)
    model.transform.min_size = model._detkit_min_size_train if train else model._detkit_min_size_test
    return model

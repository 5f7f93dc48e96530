"""Converting torchvision's Faster R-CNN weights into detkit checkpoints.

``convert_torchvision(src, out)`` maps a ``fasterrcnn_resnet50_fpn`` state dict onto
detkit's R50-FPN Faster R-CNN configured exactly like torchvision's
(``torchvision_r50_fpn_config``; also ``configs/faster_rcnn/r50_fpn_torchvision_coco.yaml``),
so detkit's detections equal torchvision's on the same images. With torchvision's
COCO-trained weights (37.0 box AP) users can run those in detkit.

Key mapping (torchvision -> detkit):
    backbone.body.*                  -> backbone.body.*          (same ResNet modules)
    backbone.fpn.*                   -> backbone.fpn.*           (same FeaturePyramidNetwork)
    rpn.head.conv.0.0.* / conv.*     -> proposal_generator.head.conv.0.*
    rpn.head.{cls_logits,bbox_pred}  -> proposal_generator.head.{cls_logits,bbox_pred}
    roi_heads.box_head.{fc6,fc7}     -> roi_head.box_head.{fc6,fc7}
    roi_heads.box_predictor.cls_score -> roi_head.predictor.cls_score   (K + 1 logits)
    roi_heads.box_predictor.bbox_pred -> roi_head.predictor.bbox_pred   (background rows dropped:
                                          torchvision regresses 4(K+1) deltas, detkit 4K)
BatchNorm's ``num_batches_tracked`` counters are dropped (detkit uses frozen BatchNorm).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from detkit.config import to_dict
from detkit.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from detkit.errors import CheckpointError
from detkit.schema import Config


def torchvision_r50_fpn_config() -> Config:
    """The settings of torchvision's fasterrcnn_resnet50_fpn (v1), as a detkit Config."""
    cfg = Config()
    cfg.data.input.min_size_train = [800]
    cfg.data.input.min_size_test = 800
    cfg.data.input.max_size = 1333
    b = cfg.model.backbone
    b.name, b.fpn, b.out_channels, b.norm, b.frozen_stages = "resnet50", True, 256, "frozen_bn", 2
    a = cfg.model.anchors
    a.sizes = [[32.0], [64.0], [128.0], [256.0], [512.0]]
    a.aspect_ratios = [[0.5, 1.0, 2.0]]
    a.offset = 0.0
    a.strides_from_input = True  # torchvision's stride rule (see anchors.py)
    r = cfg.model.proposals.rpn
    r.pre_nms_topk_train, r.pre_nms_topk_test = 2000, 1000
    r.post_nms_topk_train, r.post_nms_topk_test = 2000, 1000
    r.nms_thresh, r.min_size, r.score_thresh, r.allowed_border = 0.7, 1e-3, 0.0, -1.0
    h = cfg.model.roi_head
    h.pooler, h.pooler_resolution, h.sampling_ratio, h.aligned = "roi_align", 7, 2, False
    h.cpu_sparse_roi_align = False  # torchvision's own kernel: the same detections bit for bit
    cfg.model.channels_last_inference = False  # and torchvision's memory layout
    cfg.model.fold_batchnorm = False  # and its unfolded frozen BatchNorm
    h.fc_dims = [1024, 1024]
    h.batch_size_per_image, h.positive_fraction, h.bg_iou_thresh_lo = 512, 0.25, 0.0
    h.score_thresh, h.nms_thresh, h.detections_per_img, h.min_box_size = 0.05, 0.5, 100, 1e-2
    cfg.test.metric = "coco"
    return cfg


_RENAMES = [
    (r"^rpn\.head\.conv\.0\.0\.", "proposal_generator.head.conv.0."),  # torchvision >= 0.13
    (r"^rpn\.head\.conv\.", "proposal_generator.head.conv.0."),  # older torchvision
    (r"^rpn\.head\.", "proposal_generator.head."),
    (r"^roi_heads\.box_head\.", "roi_head.box_head."),
    (r"^roi_heads\.box_predictor\.", "roi_head.predictor."),
    (r"^backbone\.", "backbone."),
]


def map_torchvision_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision Faster R-CNN state dict -> detkit Detector state dict."""
    out = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key, count=1)
                break
        else:
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise CheckpointError(
            f"not a torchvision Faster R-CNN state dict: {len(unknown)} unknown keys, e.g. {unknown[:3]}"
        )
    for suffix in ("weight", "bias"):
        key = f"roi_head.predictor.bbox_pred.{suffix}"
        if key in out:
            out[key] = out[key][4:]  # drop the background class's 4 deltas
    return out


def coco_category_names() -> List[str]:
    """torchvision's 91 COCO entries without '__background__' (with its 'N/A' gaps), so that
    detkit label k is torchvision label k."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def convert_torchvision(src, out, num_classes: Optional[int] = None, class_names: Optional[List[str]] = None) -> str:
    """Write a detkit checkpoint for the torchvision state dict in ``src``; returns a summary."""
    from detkit.modeling.build import build_model

    state = load_checkpoint(src)["model"]
    mapped = map_torchvision_state(state)
    if "roi_head.predictor.cls_score.weight" not in mapped:
        raise CheckpointError(f"{src}: no roi_heads.box_predictor.cls_score weights")
    k = mapped["roi_head.predictor.cls_score.weight"].shape[0] - 1
    if num_classes is not None and num_classes != k:
        raise CheckpointError(f"{src} has {k} foreground classes, not {num_classes}")
    if class_names is None:
        class_names = coco_category_names() if k == 90 else [f"class{i}" for i in range(1, k + 1)]
    if len(class_names) != k:
        raise CheckpointError(f"{len(class_names)} class names for {k} classes")
    cfg = torchvision_r50_fpn_config()
    cfg.data.classes = list(class_names)
    model = build_model(cfg.model, k)
    load_model_state(model, mapped, f"{src} (mapped from torchvision)")
    save_checkpoint(
        Path(out),
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "class_names": list(class_names),
            "iteration": 0,
            "source": f"torchvision:{Path(src).name}",
        },
    )
    return f"R50-FPN Faster R-CNN, {k} classes"

"""Every shipped config validates against the schema and builds its model (pretrained
weights switched off: tests never download); the paper / detectron2 values the configs cite
survive inheritance; the schema's name Literals are the builder tables' names."""

from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from detkit.config import load_config
from detkit.data.build import DATASET_FORMATS
from detkit.modeling.build import BACKBONES, PROPOSAL_GENERATORS, ROI_HEADS, build_model
from detkit.modeling.heads.fast_rcnn import FastRCNNHead
from detkit.modeling.heads.rcnn_svm import RCNNHead, SPPHead
from detkit.modeling.heads.res5 import Res5Head
from detkit.schema import BackboneConfig, Config, DatasetConfig, ProposalConfig, RoIHeadConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {
        "quickstart_shapes.yaml",
        "quickstart_res5.yaml",
        "bccd_r18_fpn.yaml",
        "vgg16_voc07.yaml",
        "r50_fpn_1x_coco.yaml",
        "r50_c4_voc07.yaml",
    } <= names
    for folder in ("rcnn", "spp"):  # issue 9: a paper, a BCCD and a shapes config each
        assert {"alexnet_voc07.yaml", "bccd_alexnet.yaml", "shapes.yaml"} <= {
            p.name for p in CONFIGS if p.parent.name == folder
        }


def _literal(cls, name):
    return set(get_args(get_type_hints(cls)[name]))


@pytest.mark.parametrize(
    "cls, key, table",
    [
        (BackboneConfig, "name", BACKBONES),
        (ProposalConfig, "method", PROPOSAL_GENERATORS),
        (RoIHeadConfig, "name", ROI_HEADS),
        (DatasetConfig, "format", DATASET_FORMATS),
    ],
    ids=["backbones", "proposal_generators", "roi_heads", "dataset_formats"],
)
def test_schema_names_are_the_builder_tables(cls, key, table):
    # a name added to a table but not to the schema (or the other way) fails here
    assert _literal(cls, key) == set(table)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    cfg = load_config(path, Config, ["model.backbone.pretrained=null"])
    model = build_model(cfg.model, num_classes=len(cfg.data.classes or ["a", "b", "c"]))
    assert isinstance(model, torch.nn.Module)
    # Paper settings that the configs cite must survive inheritance.
    if path.name == "vgg16_voc07.yaml" and path.parent.name == "faster_rcnn":  # fast_rcnn/ has its own
        assert cfg.model.proposals.rpn.post_nms_topk_test == 300  # Faster R-CNN sec. 4.1
        assert cfg.model.roi_head.pooler == "roi_pool" and cfg.model.roi_head.bg_iou_thresh_lo == 0.0
        assert cfg.train.steps == [60000] and cfg.train.base_lr == 0.001
    if path.name == "r50_fpn_1x_coco.yaml":  # detectron2's R50-FPN 1x (Base-RCNN-FPN, defaults.py)
        h, r = cfg.model.roi_head, cfg.model.proposals.rpn
        assert (h.aligned, h.sampling_ratio, h.smooth_l1_beta) == (True, 0, 0.0)  # ROIAlignV2, L1
        assert (r.post_nms_topk_train, r.pre_nms_topk_train, r.smooth_l1_beta) == (1000, 2000, 0.0)
        assert cfg.data.input.min_size_train == [640, 672, 704, 736, 768, 800]
        assert (cfg.train.max_iter, cfg.train.steps, cfg.data.batch_size) == (90000, [60000, 80000], 16)
        assert cfg.model.backbone.frozen_stages == 2 and cfg.model.backbone.norm == "frozen_bn"
    if path.name in ("r50_c4_voc07.yaml", "quickstart_res5.yaml"):  # the ResNet paper's C4 head
        assert isinstance(model.roi_head, Res5Head) and not cfg.model.backbone.fpn
        assert cfg.model.roi_head.pooler_resolution == 14
    if path.name == "r50_c4_voc07.yaml":
        assert cfg.model.backbone.norm == "frozen_bn"  # ResNet paper appendix A: BN fixed
        assert (cfg.model.roi_head.aligned, cfg.model.roi_head.sampling_ratio) == (True, 0)
    if path.name == "quickstart_shapes.yaml":
        assert isinstance(model.roi_head, FastRCNNHead)
    if path.name == "bccd_r18_fpn.yaml":
        assert cfg.data.train.root.endswith("BCCD") and cfg.data.classes == ["Platelets", "RBC", "WBC"]
    if path.name == "bccd_r18_fpn_flip_test.yaml":  # the recipe, tested with four views
        assert build_model(cfg.model, 3, cfg.data.input).test_flips == ["h", "v", "hv"]
        assert (cfg.train.max_iter, cfg.train.amp_dtype) == (450, "auto")
    if path.name == "bccd_r18_fpn_bf16.yaml":  # the recipe in bf16 with the 750-iteration schedule
        assert (cfg.train.amp_dtype, cfg.train.max_iter, cfg.train.warmup_iters, cfg.train.steps) == (
            "bf16",
            750,
            250,
            [600],
        )
        assert cfg.model.backbone.out_channels == 128 and cfg.data.input.test_flips == ["h", "v", "hv"]
    if path.parent.name == "rcnn":  # R-CNN (Girshick et al. 2014) values the configs cite
        h = cfg.model.roi_head
        assert isinstance(model.roi_head, RCNNHead) and type(model.backbone).__name__ == "ImageInput"
        assert (h.fg_iou_thresh, h.bg_iou_thresh_lo, h.positive_fraction, h.nms_thresh) == (0.5, 0.0, 0.25, 0.3)
        assert (h.svm.neg_iou, h.svm.box_lambda, h.svm.box_min_overlap, h.svm.topk_per_class) == (0.3, 1000.0, 0.6, 100)
        assert (h.svm.pos_weight, h.svm.bias_mult, h.score_thresh) == (2.0, 10.0, float("-inf"))
        assert cfg.model.proposals.method == "precomputed"
    if path.parent.name == "spp":  # SPP-net (He et al. 2014) values
        h = cfg.model.roi_head
        assert isinstance(model.roi_head, SPPHead) and h.spp_levels == [6, 3, 2, 1]
        assert (h.fg_iou_thresh, h.bg_iou_thresh_lo, h.positive_fraction, h.svm.neg_iou) == (0.5, 0.1, 0.25, 0.3)
    if path.name == "alexnet_voc07.yaml":  # the paper configs: ImageNet AlexNet, the papers' schedules
        assert cfg.model.backbone.name == "alexnet" and cfg.model.backbone.norm == "none"
        assert cfg.test.metric == "voc07" and cfg.model.roi_head.fc_dims == [4096, 4096]
        if path.parent.name == "rcnn":
            assert (cfg.model.roi_head.warp_size, cfg.model.roi_head.warp_context) == (227, 16)
            assert (cfg.train.base_lr, cfg.model.roi_head.svm.C, cfg.model.backbone.frozen_stages) == (0.001, 0.001, 0)
            assert cfg.data.batch_size * cfg.model.roi_head.batch_size_per_image == 128  # sec. 2.3
        if path.parent.name == "spp":
            assert cfg.model.backbone.frozen_stages == 5 and cfg.data.input.min_size_test == 688  # sec. 4.2
            assert (cfg.train.base_lr, cfg.train.steps, cfg.train.max_iter) == (0.0001, [250000], 300000)

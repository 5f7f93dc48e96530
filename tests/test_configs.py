"""Every shipped config validates against the schema and builds its model (pretrained
weights switched off: tests never download)."""

from pathlib import Path

import pytest
import torch

from detkit.config import load_config
from detkit.modeling.build import build_model
from detkit.schema import Config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"quickstart_shapes.yaml", "bccd_r18_fpn.yaml", "vgg16_voc07.yaml", "r50_fpn_1x_coco.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    cfg = load_config(path, Config, ["model.backbone.pretrained=null"])
    model = build_model(cfg.model, num_classes=len(cfg.data.classes or ["a", "b", "c"]))
    assert isinstance(model, torch.nn.Module)
    # Paper settings that the configs cite must survive inheritance.
    if path.name == "vgg16_voc07.yaml":
        assert cfg.model.proposals.rpn.post_nms_topk_test == 300  # Faster R-CNN sec. 4.1
        assert cfg.model.roi_head.pooler == "roi_pool" and cfg.model.roi_head.bg_iou_thresh_lo == 0.0
        assert cfg.train.steps == [60000] and cfg.train.base_lr == 0.001
    if path.name == "bccd_r18_fpn.yaml":
        assert cfg.data.train.root.endswith("BCCD") and cfg.data.classes == ["Platelets", "RBC", "WBC"]

"""Model config values that pass the schema's types but that a part cannot work with are
ConfigErrors naming the key (one line), found before anything is built: in the schema's
checks (no backbone knowledge needed) or in ``modeling.build.check_model_config`` (anchor
levels against the backbone's maps, frozen stages against the body, a Res5 head's backbone).
``detkit train`` prints that one line and creates no run folder."""

import pytest
import yaml

from detkit.cli import main as cli_main
from detkit.config import from_dict
from detkit.errors import ConfigError
from detkit.modeling.build import build_model, build_roi_head, check_model_config
from detkit.schema import Config, ModelConfig


def model(**sections):
    """A Config whose model section is ``sections`` (so error paths start at ``model.``)."""
    return from_dict(Config, {"model": sections}).model


TINY_C4 = {"name": "tiny", "fpn": False}


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"proposals": {"rpn": {"fg_iou_thresh": 0.2}}},
            "model.proposals.rpn: fg_iou_thresh (0.2) must be >= bg_iou_thresh (0.3), both in [0, 1]",
        ),
        ({"proposals": {"rpn": {"post_nms_topk_train": 0}}}, "model.proposals.rpn: post_nms_topk_train: must be >= 1"),
        ({"proposals": {"rpn": {"box_weights": [1.0, 1.0, 1.0]}}}, "model.proposals.rpn: box_weights: 4 positive"),
        ({"anchors": {"offset": 1.0}}, "model.anchors: offset: must be in [0, 1) (a fraction of the stride), got 1.0"),
        ({"anchors": {"sizes": [[32], []]}}, "model.anchors: sizes: non-empty lists of positive values"),
        ({"anchors": {"aspect_ratios": [[0.0, 1.0]]}}, "model.anchors: aspect_ratios: non-empty lists of positive"),
        (
            {"roi_head": {"bg_iou_thresh_lo": 0.5}},
            "model.roi_head: bg_iou_thresh_lo (0.5) must be below fg_iou_thresh (0.5), both in [0, 1]",
        ),
        (
            {"roi_head": {"pooler": "roi_pool", "aligned": True}},
            "model.roi_head: aligned: true is RoIAlign's half-pixel offset and does not apply to pooler roi_pool",
        ),
        ({"roi_head": {"sampling_ratio": -1}}, "model.roi_head: sampling_ratio: must be >= 0 (0 = adaptive)"),
        ({"roi_head": {"dropout": 1.0}}, "model.roi_head: dropout: must be in [0, 1)"),
        ({"roi_head": {"detections_per_img": 0}}, "model.roi_head: detections_per_img: must be >= 1"),
        ({"backbone": {"name": "vgg16", "norm": "syncbn"}}, "model.backbone: norm: syncbn is not available for vgg16"),
        ({"backbone": {"norm": "none"}}, "model.backbone: norm: none: resnet50 needs a normalisation layer"),
        ({"backbone": {"name": "vgg16", "norm": "gn"}}, "model.backbone: norm: gn is not available for vgg16"),
        ({"backbone": {"name": "tiny", "tiny_widths": [8, 16, 32]}}, "model.backbone: tiny_widths: 4 positive"),
        ({"backbone": {"frozen_stages": -1}}, "model.backbone: frozen_stages: must be >= 0, got -1"),
    ],
)
def test_schema_checks_name_the_key(sections, message):
    with pytest.raises(ConfigError) as info:
        model(**sections)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"backbone": TINY_C4},  # the default anchors have 5 levels (FPN's)
            "model.anchors.sizes: 5 levels, but the backbone (tiny, fpn: false) gives 1 feature map (c4): "
            "one list per map, or one list for all",
        ),
        (
            {"backbone": {"name": "tiny"}, "anchors": {"aspect_ratios": [[1.0], [0.5, 1.0]]}},
            "model.anchors.aspect_ratios: 2 levels, but the backbone (tiny, fpn: true) gives 5 feature maps "
            "(p2, p3, p4, p5, p6)",
        ),
        (
            {"backbone": {**TINY_C4, "frozen_stages": 5}, "anchors": {"sizes": [[32]]}},
            "model.backbone.frozen_stages: 5 is out of range for tiny C4 (0..4; k freezes the stem and "
            "layer1..layer(k-1))",
        ),
        (
            {"backbone": {"name": "resnet18", "frozen_stages": 6}},
            "model.backbone.frozen_stages: 6 is out of range for resnet18 FPN (0..5;",
        ),
        (
            {
                "backbone": {"name": "vgg16", "fpn": False, "norm": "none", "frozen_stages": 6},
                "anchors": {"sizes": [[64]]},
            },
            "model.backbone.frozen_stages: 6 is out of range for vgg16 C4 (0..5; k freezes conv blocks 1..k)",
        ),
        (
            {"backbone": {"name": "tiny"}, "roi_head": {"name": "res5"}},
            "model.roi_head.name: res5 runs the ResNet stage after C4 per region: it needs a ResNet or tiny backbone "
            "with the single C4 map (model.backbone.fpn: false), got tiny with fpn: true",
        ),
    ],
)
def test_build_checks_name_the_key(sections, message):
    cfg = model(**sections)
    for check in (check_model_config, lambda c: build_model(c, num_classes=3)):
        with pytest.raises(ConfigError) as info:
            check(cfg)
        assert str(info.value).startswith(message)


def test_build_checks_come_before_loading_weights():
    # frozen_stages is checked before the (missing) pretrained file is looked at
    cfg = model(backbone={"name": "resnet50", "pretrained": "/nonexistent/r50.pth", "frozen_stages": 9})
    with pytest.raises(ConfigError, match="model.backbone.frozen_stages: 9"):
        build_model(cfg, num_classes=3)


def test_anchor_levels_are_not_checked_for_other_proposal_sources(tmp_path):
    # Selective Search has no anchors: FPN-style anchor settings on a C4 map do not matter
    cfg = model(backbone={**TINY_C4}, proposals={"method": "selective_search"})
    build_model(cfg, num_classes=3)


def test_pooler_needs_consecutive_power_of_two_strides():
    class OddStrides:
        out_features = ["a", "b"]
        out_channels = 8
        out_strides = {"a": 4, "b": 12}
        size_divisibility = 12

    cfg = model(backbone={"name": "tiny", "fpn": False})
    with pytest.raises(ConfigError, match=r"model.backbone: the RoI pooler needs feature strides that are consecutive"):
        build_roi_head(cfg, OddStrides(), 3)


def test_detkit_train_prints_one_line_and_creates_no_run(tmp_path, capsys):
    config = {
        "data": {
            "train": {
                "format": "shapes",
                "root": str(tmp_path / "shapes"),
                "split": "train",
                "shapes": {"num_train": 2, "num_test": 1},
            },
            "input": {"min_size_train": [96], "max_size": 128, "min_size_test": 96},
        },
        "model": {"backbone": {"name": "tiny", "fpn": False}},  # 5 anchor levels for 1 map
        "train": {"max_iter": 1},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert cli_main(["train", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "detkit: error: model.anchors.sizes: 5 levels, but the backbone (tiny, fpn: false) gives 1 feature map (c4): "
        "one list per map, or one list for all"
    ]
    assert not out.exists()


def test_model_config_defaults_pass_every_check():
    check_model_config(ModelConfig())

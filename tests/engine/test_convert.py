"""torchvision parity: a seeded, randomly initialised torchvision fasterrcnn_resnet50_fpn,
converted with ``detkit convert``, gives the same detections in detkit."""

import numpy as np
import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from detkit.cli import main as cli_main
from detkit.data.transforms import build_transforms
from detkit.engine.convert import map_torchvision_state
from detkit.engine.predictor import Predictor
from detkit.errors import CheckpointError

# 352 px shorter side: small enough for a fast test, and the padded 352 x 480 input gives an
# odd P5 (11 x 15), which exercises torchvision's stride rule for P6 (352 // 6 = 58, not 64).
MIN_SIZE = 352


def _torchvision_model():
    """fasterrcnn_resnet50_fpn as torchvision builds it for its COCO weights (frozen BatchNorm,
    3 trainable stages), randomly initialised."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    model = FasterRCNN(backbone, num_classes=91, min_size=MIN_SIZE, max_size=1333)
    # Random BatchNorm statistics, so that the frozen-BN conversion is really exercised.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    # A randomly initialised head spreads ~1/91 over the classes, below the 0.05 score
    # threshold: lift three classes so that there are detections to compare.
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[[1, 3, 18]] += 4.0
    return model.eval()


def _images():
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((480, 640), (300, 410)):
        # Smooth blobs rather than white noise so that features and boxes vary with place.
        base = rng.random((h // 20 + 1, w // 20 + 1, 3))
        img = torch.nn.functional.interpolate(
            torch.tensor(base).permute(2, 0, 1)[None].float(), size=(h, w), mode="bilinear"
        )[0]
        images.append((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    return images


def _match(tv, dk):
    """Pairs each torchvision detection with the detkit one of the same label and nearest box."""
    assert len(tv["boxes"]) == len(dk.boxes), (len(tv["boxes"]), len(dk.boxes))
    used = set()
    worst_box, worst_score = 0.0, 0.0
    for box, score, label in zip(tv["boxes"], tv["scores"], tv["labels"]):
        d = (dk.boxes - box).abs().max(dim=1).values
        d[dk.labels != label] = float("inf")
        for i in used:
            d[i] = float("inf")
        j = int(d.argmin())
        used.add(j)
        worst_box = max(worst_box, float(d[j]))
        worst_score = max(worst_score, float((dk.scores[j] - score).abs()))
    return worst_box, worst_score


def test_converted_torchvision_model_gives_the_same_detections(tmp_path):
    tv_model = _torchvision_model()
    src = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), src)
    out = tmp_path / "converted.pt"
    assert cli_main(["convert", "--from", "torchvision", str(src), "--out", str(out)]) == 0

    predictor = Predictor.from_checkpoint(out, device="cpu")
    predictor.cfg.data.input.min_size_test = MIN_SIZE
    predictor.transforms = build_transforms(False, min_size_test=MIN_SIZE, max_size=1333)
    images = _images()
    with torch.no_grad():
        tv_out = tv_model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    dk_out = predictor.predict_batch(images)
    total = 0
    for tv, dk in zip(tv_out, dk_out):
        assert len(tv["boxes"]) > 5  # the biased classes produce real detections
        box_err, score_err = _match(tv, dk)
        assert box_err < 1e-3, box_err
        assert score_err < 1e-4, score_err
        total += len(tv["boxes"])
    assert predictor.class_names[0] == "person" and len(predictor.class_names) == 90
    assert total > 10


def test_mapping_drops_background_deltas_and_rejects_foreign_keys():
    state = {
        "roi_heads.box_predictor.bbox_pred.weight": torch.arange(12.0).view(3 * 4, 1),
        "roi_heads.box_predictor.bbox_pred.bias": torch.arange(12.0),
        "rpn.head.conv.0.0.weight": torch.zeros(1),
        "backbone.body.bn1.num_batches_tracked": torch.tensor(5),
    }
    mapped = map_torchvision_state(state)
    assert torch.equal(mapped["roi_head.predictor.bbox_pred.bias"], torch.arange(4.0, 12.0))
    assert "proposal_generator.head.conv.0.weight" in mapped
    assert not any("num_batches_tracked" in k for k in mapped)
    with pytest.raises(CheckpointError, match="unknown keys"):
        map_torchvision_state({"classifier.weight": torch.zeros(1)})


def test_shipped_torchvision_config_matches_the_converter():
    from pathlib import Path

    from detkit.config import load_config, to_dict
    from detkit.engine.convert import torchvision_r50_fpn_config
    from detkit.schema import Config

    path = Path(__file__).resolve().parents[2] / "configs/faster_rcnn/r50_fpn_torchvision_coco.yaml"
    shipped = to_dict(load_config(path, Config))
    built = to_dict(torchvision_r50_fpn_config())
    assert shipped["model"] == built["model"]
    assert shipped["data"]["input"] == built["data"]["input"]

"""Export parity: a seeded tiny detector exported to ONNX (run by onnxruntime) and to
TorchScript gives the eager model's detections on two images of sizes other than the traced
one (boxes within 1e-3 px, scores within 1e-4), for the Fast R-CNN head on FPN (RoIAlign over
four levels; also SVD-compressed), the Res5 head on C4, and the Fast R-CNN head with RoIPool
on one map; plus the stored metadata, an image without detections, and the refusals of what
cannot export.

The models are randomly initialised with biased class logits (as tests/engine/
test_convert.py does for torchvision's model), so that there are real detections: two
classes lifted by different amounts, one left below the score threshold."""

import json

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from detkit.config import from_dict
from detkit.engine.export import (
    EXPORT_FORMAT,
    METADATA_KEY,
    ExportableDetector,
    check_exportable,
    export_model,
    load_exported,
    resized_size,
)
from detkit.errors import ExportError
from detkit.modeling.build import build_model
from detkit.schema import Config
from detkit.structures import ImageList

CLASSES = ["circle", "square", "triangle"]
INPUT = {"min_size_test": 192, "max_size": 320}  # traced at 192 x 256 (a 480 x 640 image)
# Two network inputs of other sizes than the traced one, neither a multiple of the FPN's 32:
# larger and smaller (with PRE_NMS_TOPK, P4 has more anchors than the top-k keeps when traced,
# fewer in the small image, and P6 fewer in both), landscape and portrait.
SIZES = [(224, 300), (160, 150)]
PRE_NMS_TOPK = 500

MODELS = {
    "fast_rcnn_fpn": {
        "backbone": {"name": "tiny", "fpn": True, "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
        "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
        "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32]},
    },
    "res5_c4": {
        "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 24]},
        "anchors": {"sizes": [[16, 32, 64]]},
        "roi_head": {"name": "res5", "pooler_resolution": 14},
    },
    "fast_rcnn_roi_pool": {
        "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 24]},
        "anchors": {"sizes": [[32, 64, 128]], "strides_from_input": True},
        "roi_head": {"name": "fast_rcnn", "pooler": "roi_pool", "fc_dims": [32, 32], "class_agnostic": True},
    },
}


def tiny_config(model: dict, **roi_head) -> Config:
    # No cap on detections: with random weights many scores tie, and a cap would cut the tie
    # at an arbitrary member.
    model = {
        **model,
        "roi_head": {**model["roi_head"], "detections_per_img": 1000, **roi_head},
        "proposals": model.get("proposals", {"rpn": {"pre_nms_topk_test": PRE_NMS_TOPK, "post_nms_topk_test": 300}}),
    }
    return from_dict(Config, {"data": {"classes": CLASSES, "input": INPUT}, "model": model})


def tiny_detector(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(CLASSES), cfg.data.input).eval()
    with torch.no_grad():
        # Softmax of ~[0, 4, 0, 4.5]: circle and triangle around 0.4-0.6, square far below 0.05.
        model.roi_head.predictor.cls_score.bias[1] += 4.0
        model.roi_head.predictor.cls_score.bias[3] += 4.5
        # Box deltas as a trained model predicts them, not the near-zero ones of the
        # initialisation: boxes that stay on the anchor grid overlap each other with IoUs of
        # exactly 0.5 or 0.7, the NMS thresholds, where float rounding decides (the eager
        # model runs torchvision's per-class NMS above 1000 boxes, a trace its offset trick).
        torch.nn.init.normal_(model.proposal_generator.head.bbox_pred.weight, std=0.05)
        torch.nn.init.normal_(model.roi_head.predictor.bbox_pred.weight, std=0.05)
    return model


def image(height: int, width: int, seed: int) -> torch.Tensor:
    """A normalised input with smooth random blobs (features and boxes vary with place)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=g)
    return (F.interpolate(base, size=(height, width), mode="bilinear")[0] - 0.45) / 0.25


def eager(model, x):
    with torch.no_grad():
        (det,), _ = model(ImageList.from_tensors([x], model.size_divisibility))
    return det


def assert_same_detections(ref, boxes, scores, labels):
    """Every eager detection has an exported one of the same label within 1e-3 px and 1e-4
    in score (nearest box; tied scores may come in either order), and the counts agree."""
    boxes, scores, labels = torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(labels)
    assert boxes.shape == (len(ref), 4) and scores.shape == (len(ref),) and labels.shape == (len(ref),)
    assert labels.dtype == torch.int64
    assert torch.all(scores[:-1] >= scores[1:]), "scores are not sorted best first"
    free = torch.ones(len(boxes), dtype=torch.bool)
    for box, score, label in zip(ref.boxes, ref.scores, ref.labels):
        dist = (boxes - box).abs().max(dim=1).values
        dist[(labels != label) | ~free] = float("inf")
        j = int(dist.argmin())
        assert dist[j] < 1e-3, f"no exported box within 1e-3 px of {box.tolist()} (label {int(label)})"
        assert abs(float(scores[j]) - float(score)) < 1e-4
        free[j] = False


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(model, {format: run}) for each tiny model, both files written by export_model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small graphs gain nothing from threads on a busy machine
    cfg = tiny_config(MODELS[request.param])
    model = tiny_detector(cfg)
    tmp = tmp_path_factory.mktemp(request.param)
    runs = {}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        report = export_model(model, cfg, CLASSES, tmp / name, fmt, check=False)
        assert report.traced_size == (192, 256)
        runs[fmt], meta = load_exported(tmp / name, fmt)
        assert meta["class_names"] == CLASSES
    yield model, runs
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graph_gives_the_eager_detections_at_other_sizes(exported, fmt):
    model, runs = exported
    total = 0
    for i, (h, w) in enumerate(SIZES):
        x = image(h, w, seed=10 + i)
        ref = eager(model, x)
        assert len(ref) > 10 and set(ref.labels.tolist()) == {1, 3}  # real detections, two classes
        assert_same_detections(ref, *runs[fmt](x))
        total += len(ref)
    assert total > 40


def test_onnx_file_carries_the_metadata_and_dynamic_size(tmp_path):
    cfg = tiny_config(MODELS["fast_rcnn_fpn"])
    cfg.data.input.pixel_mean = [0.5, 0.4, 0.3]
    model = tiny_detector(cfg)
    report = export_model(model, cfg, CLASSES, tmp_path / "m.onnx", "onnx", source="ck.pt")
    assert report.checked and report.agrees, report.summary()
    assert report.check_size == (268, 192)  # a portrait 700 x 500 image at 192 / 320 px
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["format"] == EXPORT_FORMAT and meta["source"] == "ck.pt"
    assert (meta["min_size"], meta["max_size"]) == (192, 320)
    assert meta["pixel_mean"] == [0.5, 0.4, 0.3] and meta["pixel_std"] == [0.229, 0.224, 0.225]
    assert meta["class_names"] == CLASSES and meta["score_thresh"] == 0.05
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]


def test_an_image_without_detections_gives_empty_outputs(tmp_path):
    cfg = tiny_config(MODELS["fast_rcnn_fpn"], score_thresh=0.99)
    model = tiny_detector(cfg)
    export_model(model, cfg, CLASSES, tmp_path / "m.onnx", "onnx", check=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = image(*SIZES[0], seed=3)
    assert len(eager(model, x)) == 0
    boxes, scores, labels = session.run(None, {"image": x.numpy()})
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


def test_an_svd_compressed_head_exports(tmp_path):
    from detkit.modeling.heads.compress import SVDLinear

    cfg = tiny_config(MODELS["fast_rcnn_fpn"], svd={"fc6": 16, "fc7": 8})
    model = tiny_detector(cfg)
    assert isinstance(model.roi_head.box_head.fc6, SVDLinear)
    export_model(model, cfg, CLASSES, tmp_path / "svd.onnx", "onnx", check=False)
    run, _ = load_exported(tmp_path / "svd.onnx")
    x = image(*SIZES[0], seed=5)
    ref = eager(model, x)
    assert len(ref) > 10
    assert_same_detections(ref, *run(x))


def test_resized_size_follows_the_test_transform():
    from detkit.data.transforms import ResizeShortestEdge

    for h, w in ((480, 640), (700, 500), (100, 1000)):
        resized, _ = ResizeShortestEdge([192], 320)(torch.zeros(3, h, w), None)
        assert resized_size(192, 320, h, w) == tuple(resized.shape[-2:])


def test_the_wrapper_leaves_the_model_alone():
    cfg = tiny_config(MODELS["fast_rcnn_fpn"])
    model = tiny_detector(cfg)
    wrapper = ExportableDetector(model)
    assert model.roi_head.pooler.cpu_sparse and not wrapper.model.roi_head.pooler.cpu_sparse
    x = image(*SIZES[1], seed=4)
    ref = eager(model, x)
    with torch.no_grad():
        assert_same_detections(ref, *wrapper(x))  # the untraced wrapper: padding inside


@pytest.mark.parametrize(
    "proposals, message",
    [
        (
            {"method": "selective_search"},
            "model.proposals.method: selective_search cannot be exported: Selective Search segments",
        ),
        (
            {"method": "precomputed", "precomputed": {"path": "props.npz"}},
            "model.proposals.method: precomputed cannot be exported: its proposals are looked up by image id",
        ),
    ],
)
def test_proposal_sources_that_are_not_tensor_operators_are_refused(proposals, message):
    model_cfg = {**MODELS["fast_rcnn_fpn"], "proposals": proposals}
    model = build_model(tiny_config(model_cfg).model, len(CLASSES))
    with pytest.raises(ExportError, match=message) as info:
        check_exportable(model)
    assert "\n" not in str(info.value)


def test_other_heads_and_multi_scale_testing_are_refused():
    model = build_model(tiny_config(MODELS["fast_rcnn_fpn"]).model, len(CLASSES))

    class RCNNHead(torch.nn.Module):  # stands in for heads.rcnn_svm.RCNNHead
        num_classes = 3

        def forward(self, images, features, proposals, targets=None):
            return [], {}

    model.roi_head = RCNNHead()
    with pytest.raises(ExportError, match="model.roi_head.name: rcnn cannot be exported: R-CNN's head runs the CNN"):
        check_exportable(model)
    cfg = tiny_config(MODELS["fast_rcnn_fpn"])
    cfg.data.input.test_scales = [160, 192]
    model = build_model(cfg.model, len(CLASSES), cfg.data.input)
    with pytest.raises(ExportError, match="data.input.test_scales: multi-scale testing cannot be exported"):
        check_exportable(model)
    cfg = tiny_config(MODELS["fast_rcnn_fpn"])
    cfg.data.input.test_flips = ["h"]
    model = build_model(cfg.model, len(CLASSES), cfg.data.input)
    with pytest.raises(ExportError, match="data.input.test_flips: test-time mirroring cannot be exported"):
        check_exportable(model)

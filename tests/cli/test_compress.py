"""``detkit compress``: a trained checkpoint round trip (compress -> the stored config has
model.roi_head.svd -> ``detkit eval`` / ``detkit demo`` / ``model_from_checkpoint`` load it
with the user's plain config or none), full rank = the same network, truncated rank = the
SVD of each layer, the report's figures, and the bad inputs (one line, the original never
touched)."""

import hashlib
import json

import pytest
import torch

from detkit.cli import main
from detkit.config import to_dict
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.engine.predictor import model_from_checkpoint
from detkit.modeling.heads.compress import SVDLinear
from detkit.structures import ImageList

TINY = """
data:
  train:
    format: shapes
    root: {root}
    split: train
    shapes: &s {{num_train: 6, num_test: 3, seed: 1, image_size: [96, 112], object_size: [20, 40]}}
  test:
    format: shapes
    root: {root}
    split: test
    shapes: *s
  input: {{min_size_train: [96], max_size: 128, min_size_test: 96}}
  batch_size: 2
model:
  backbone: {{name: tiny, out_channels: 16, tiny_widths: [8, 16, 16, 16]}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  roi_head: {{fc_dims: [32, 24], batch_size_per_image: 32, pooler_resolution: 4, score_thresh: 0.0}}
  proposals:
    rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 100, pre_nms_topk_test: 100, post_nms_topk_test: 50}}
train: {{max_iter: 2, warmup_iters: 1, log_period: 1, device: cpu, num_threads: 1}}
test: {{metric: voc, extra_metrics: [voc07]}}
"""
# fc6: 16 channels x 4 x 4 = 256 inputs -> 32; fc7: 32 -> 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY.format(root=tmp / "shapes"))
    out = tmp / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return cfg, out / "model_final.pt"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(ckpt, cfg=None):
    """The head's raw outputs for fixed boxes on a fixed image, from a checkpoint loaded the
    way detkit eval loads it."""
    from detkit.schema import load_run_config

    model, _, _ = model_from_checkpoint(ckpt, load_run_config(cfg) if cfg else None)
    torch.manual_seed(0)
    images = ImageList(torch.randn(1, 3, 96, 112), [(96, 112)])
    boxes = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [30.0, 10.0, 90.0, 80.0], [0.0, 0.0, 112.0, 96.0]])]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        return model, model.roi_head.predict(images, features, boxes)


def test_full_rank_round_trip_through_compress_and_eval(run, tmp_path):
    cfg, ckpt = run
    before = _digest(ckpt)
    out = tmp_path / "full.pt"
    assert main(["compress", str(ckpt), "--fc6", "32", "--fc7", "24", "--out", str(out), "--no-progress"]) == 0
    assert _digest(ckpt) == before  # the original is untouched
    stored = load_checkpoint(out)
    assert stored["config"]["model"]["roi_head"]["svd"] == {"fc6": 32, "fc7": 24}
    assert "optimizer" not in stored and stored["class_names"] == ["circle", "square", "triangle"]
    # loaded with the user's plain config (no svd in it): the checkpoint's structure wins
    model, (cls, deltas) = _outputs(out, cfg)
    assert isinstance(model.roi_head.box_head.fc6, SVDLinear) and model.roi_head.box_head.fc6.rank == 32
    _, (cls0, deltas0) = _outputs(ckpt, cfg)
    torch.testing.assert_close(cls, cls0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deltas, deltas0, rtol=1e-4, atol=1e-5)
    # the report: hand-computed parameter counts, timing and mAP before / after
    report = json.loads((tmp_path / "full.compress.json").read_text())
    assert report["layers"]["fc6"] == {"shape": [32, 256], "rank": 32, "params_before": 8224, "params_after": 9248}
    assert report["layers"]["fc7"] == {"shape": [24, 32], "rank": 24, "params_before": 792, "params_after": 1368}
    assert report["model_params"]["after"] - report["model_params"]["before"] == (9248 - 8224) + (1368 - 792)
    for when in ("before", "after"):
        assert report["s_per_img"][when]["images"] == 3 and report["s_per_img"][when]["head"] > 0
    assert set(report["mAP"]["before"]) == {"voc", "voc07"}
    assert report["mAP"]["after"]["voc"] == pytest.approx(report["mAP"]["before"]["voc"], abs=1e-3)
    # detkit eval with the plain config takes the compressed checkpoint as it is
    assert main(["eval", str(cfg), "--checkpoint", str(out), "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert evaluated["mAP"] == pytest.approx(report["mAP"]["after"]["voc"], abs=1e-9)


def test_truncated_ranks_are_each_layers_svd_and_load_in_demo(run, tmp_path):
    cfg, ckpt = run
    out = tmp_path / "small.pt"
    args = ["compress", str(ckpt), "--layer", "fc6=8", "--fc7", "4", "--out", str(out), "--no-eval"]
    assert main(args + ["--time-images", "0"]) == 0
    original = load_checkpoint(ckpt)["model"]
    state = load_checkpoint(out)["model"]
    for name, rank in (("fc6", 8), ("fc7", 4)):
        w = original[f"roi_head.box_head.{name}.weight"].double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        expected = (u[:, :rank] * s[:rank]) @ vh[:rank]  # the rank-t truncation, independently
        product = state[f"roi_head.box_head.{name}.expand.weight"] @ state[f"roi_head.box_head.{name}.reduce.weight"]
        torch.testing.assert_close(product.double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(state[f"roi_head.box_head.{name}.expand.bias"], original[f"roi_head.box_head.{name}.bias"])
    report = json.loads((tmp_path / "small.compress.json").read_text())
    assert report["layers"]["fc6"]["params_after"] == 8 * (256 + 32) + 32
    assert "mAP" not in report and "s_per_img" not in report
    # detkit demo with no --config: the stored config builds the factorised head
    image = tmp_path / "img.png"
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)).save(image)
    assert main(["demo", "--checkpoint", str(out), "--out", str(tmp_path / "demo"), str(image)]) == 0
    assert (tmp_path / "demo" / "img.json").is_file()


def test_bad_inputs_are_one_line_and_never_touch_the_original(run, tmp_path, capsys):
    cfg, ckpt = run
    before = _digest(ckpt)
    compressed = tmp_path / "c.pt"
    assert main(["compress", str(ckpt), "--fc6", "4", "--out", str(compressed), "--no-eval", "--time-images", "0"]) == 0
    capsys.readouterr()

    def fails(args, message):
        assert main(["compress"] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    fails([str(ckpt), "--fc6", "4", "--out", str(ckpt)], "is the checkpoint itself")
    fails(
        [str(ckpt), "--fc6", "33", "--out", str(tmp_path / "x.pt")], "SVD rank 33 must be in 1..32 for a 32 x 256 layer"
    )
    fails(
        [str(ckpt), "--layer", "fc9=3", "--out", str(tmp_path / "x.pt")],
        "no fully connected layer fc9 (its fc layers: fc6, fc7)",
    )
    fails([str(ckpt), "--layer", "fc6", "--out", str(tmp_path / "x.pt")], "expected NAME=RANK")
    fails([str(ckpt), "--out", str(tmp_path / "x.pt")], "no layer to compress")
    fails(
        [str(compressed), "--fc7", "4", "--out", str(tmp_path / "x.pt")],
        "is compressed already (model.roi_head.svd: fc6=4)",
    )
    fails([str(ckpt), "--fc6", "4", "--out", str(compressed)], "exists; pass --overwrite")
    assert not (tmp_path / "x.pt").exists() and _digest(ckpt) == before

    # a head without fully connected layers (the Res5 head runs res5 per region)
    res5 = load_checkpoint(ckpt)
    res5["config"]["model"]["backbone"]["fpn"] = False
    res5["config"]["model"]["anchors"]["sizes"] = [[16, 32, 64]]
    res5["config"]["model"]["roi_head"]["name"] = "res5"
    from detkit.config import from_dict
    from detkit.modeling.build import build_model
    from detkit.schema import Config

    res5_cfg = from_dict(Config, res5["config"])
    model = build_model(res5_cfg.model, 3, res5_cfg.data.input)
    save_checkpoint(
        tmp_path / "res5.pt",
        {"model": model.state_dict(), "config": to_dict(res5_cfg), "class_names": res5["class_names"]},
    )
    fails(
        [str(tmp_path / "res5.pt"), "--fc6", "4", "--out", str(tmp_path / "x.pt")],
        "has no fully connected layers to compress",
    )

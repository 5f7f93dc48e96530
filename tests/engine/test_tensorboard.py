"""train.tensorboard: true writes metrics.jsonl's scalars and test images with detections to
<run>/tensorboard; without the tensorboard package it is a one-line config error."""

import json
import sys

import numpy as np
import pytest

from detkit.cli import main
from detkit.data.shapes import generate_shapes

CONFIG = """
data:
  train: {{format: voc, root: {root}, split: train}}
  test: {{format: voc, root: {root}, split: test}}
  input: {{min_size_train: [96], max_size: 128, min_size_test: 96}}
  batch_size: 2
model:
  backbone: {{name: tiny, out_channels: 16, tiny_widths: [8, 16, 16, 16]}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  roi_head: {{fc_dims: [32, 32], batch_size_per_image: 32, score_thresh: 0.0}}
train: {{max_iter: 4, warmup_iters: 2, log_period: 2, eval_period: 2, device: cpu, num_threads: 1, tensorboard: true}}
test: {{metric: voc}}
"""


@pytest.fixture
def config(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=4, num_test=2, seed=2, image_size=(96, 112), object_size=(20, 40))
    path = tmp_path / "tb.yaml"
    path.write_text(CONFIG.format(root=root))
    return path


def test_tensorboard_holds_the_metrics_and_detection_images(config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    expected = {}
    for r in records:
        for key, value in r.items():
            if key != "iter" and isinstance(value, (int, float)):
                group = "eval" if key.startswith(("eval_", "val_")) else "train"
                expected.setdefault(f"{group}/{key}", []).append((r["iter"], value))
    tags = events.Tags()
    assert set(tags["scalars"]) == set(expected)
    for key in ("train/loss", "train/loss_cls", "train/lr", "eval/eval_mAP", "eval/val_loss", "eval/val_loss_box"):
        assert key in expected
    for tag, values in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in values], tag
        assert np.allclose([v for _, v in logged], [v for _, v in values], rtol=1e-6), tag
    # At each evaluation (2, and the final one at 4) the test images with detections drawn.
    assert sorted(tags["images"]) == ["detections/0", "detections/1"]
    steps = [e.step for e in events.Images("detections/0")]
    assert steps == [2, 4]
    image = events.Images("detections/0")[0]
    assert (image.width, image.height) != (0, 0)


def test_tensorboard_without_the_package_is_a_one_line_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "detkit: error: train.tensorboard: true needs the tensorboard package: pip install tensorboard "
        "(or pip install 'detkit[tensorboard]'), or set train.tensorboard: false"
    )
    assert not out.exists()  # checked before anything is written

"""Training learns: 60 iterations of a tiny Faster R-CNN on 8 generated shapes images (through
``detkit train``) must cut the loss by more than half and detect the training images' shapes
with mAP > 0.5. Measured on the 2-core development machine (2026-11-30): 0.85 (0.74-0.87 for
train.seed 0-3); after one iteration 0.0004; with base_lr 0.02, whose classifier stays nearly
flat in 60 steps, 0.18."""

import json

from detkit.cli import main
from detkit.data.shapes import generate_shapes

CONFIG = """
data:
  train: &data {{format: voc, root: {root}, split: train}}
  test: *data          # the training images: does the model fit what it was shown?
  input: {{min_size_train: [96], max_size: 128, min_size_test: 96, flip_prob: 0.5}}
  batch_size: 8
model:
  backbone: {{name: tiny, out_channels: 32, tiny_widths: [16, 32, 64, 64], norm: bn}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  roi_head: {{fc_dims: [128, 128], batch_size_per_image: 64, positive_fraction: 0.5, score_thresh: 0.001}}
  proposals:
    rpn: {{pre_nms_topk_train: 300, post_nms_topk_train: 200, pre_nms_topk_test: 200, post_nms_topk_test: 100}}
train:
  max_iter: 60
  # A high rate, held in check by clipping, is what lets a scratch classifier separate the
  # three shapes within 60 steps.
  base_lr: 0.08
  clip_grad_norm: 2.0
  warmup_iters: 10
  lr_schedule: cosine
  log_period: 10
  device: cpu
  num_threads: 1
test: {{metric: voc}}
"""


def test_sixty_iterations_learn_the_training_images(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes(
        root, num_train=8, num_test=1, seed=5, image_size=(96, 112), object_size=(32, 48), objects_per_image=(1, 2)
    )
    cfg = tmp_path / "learn.yaml"
    cfg.write_text(CONFIG.format(root=root))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 6  # mean loss of iterations 1-10, ..., 51-60
    assert losses[-1] < 0.5 * losses[0], losses
    result = json.loads((out / "eval.json").read_text())
    assert sum(result["num_gt"].values()) >= 8
    assert result["mAP"] > 0.5, result["per_class"]

"""Resume is exact: a tiny Faster R-CNN trained 6 iterations straight and one trained 3, then
resumed for 3 more, see the same batches and the same random flips and scales (with 0 or 2
DataLoader workers), so their losses are identical and their weights and optimizer state are
equal bit for bit on the CPU."""

import json

import pytest
import torch

from detkit.config import from_dict
from detkit.data.build import build_datasets
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.stages import RunContext
from detkit.engine.trainer import Trainer
from detkit.modeling.build import build_model
from detkit.schema import Config


def tiny_config(root, max_iter, num_workers) -> Config:
    shapes = {"num_train": 6, "num_test": 1, "seed": 3, "image_size": [56, 88], "object_size": [16, 32]}
    return from_dict(
        Config,
        {
            "data": {
                "train": {"format": "shapes", "root": str(root), "split": "train", "shapes": shapes},
                # Multi-scale training and flips: the random augmentations resume must replay.
                "input": {"min_size_train": [48, 64, 80], "max_size": 128, "min_size_test": 64, "flip_prob": 0.5},
                "batch_size": 2,
                "num_workers": num_workers,
            },
            "model": {
                "backbone": {"name": "tiny", "out_channels": 8, "tiny_widths": [8, 8, 8, 8]},
                "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
                "roi_head": {"fc_dims": [16, 16], "batch_size_per_image": 16},
                "proposals": {"rpn": {"pre_nms_topk_train": 100, "post_nms_topk_train": 50}},
            },
            "train": {
                "max_iter": max_iter,
                "base_lr": 0.02,
                "warmup_iters": 2,
                "log_period": 1,
                "device": "cpu",
                "num_threads": 1,
            },
        },
    )


def train(root, out, max_iter, num_workers, resume=False):
    cfg = tiny_config(root, max_iter, num_workers)
    train_set, _, classes = build_datasets(cfg, need_train=True, need_test=False)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(classes), cfg.data.input)
    run = RunContext(cfg, model, train_set, None, out, classes, resume=resume, progress=False)
    trainer = Trainer(run)
    trainer.train()
    return trainer


def outcome(out):
    losses = [
        {k: v for k, v in json.loads(line).items() if k.startswith("loss")}
        for line in open(out / "metrics.jsonl")
        if '"loss"' in line
    ]
    state = load_checkpoint(out / "model_final.pt")
    momentum = {k: s["momentum_buffer"] for k, s in state["optimizer"]["state"].items()}
    return losses, state["model"], momentum, state["rng"]["torch"]


def assert_same(a, b):
    losses_a, model_a, momentum_a, rng_a = a
    losses_b, model_b, momentum_b, rng_b = b
    assert len(losses_a) == 6 and losses_a == losses_b
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    assert momentum_a.keys() == momentum_b.keys()
    for k in momentum_a:
        assert torch.equal(momentum_a[k], momentum_b[k]), k
    assert torch.equal(rng_a, rng_b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "shapes"
    out = root.parent / "straight"
    train(root, out, 6, num_workers=0)
    return root, outcome(out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_three_plus_three_equals_six(straight, tmp_path, num_workers):
    root, reference = straight
    out = tmp_path / "split"
    train(root, out, 3, num_workers)
    resumed = train(root, out, 6, num_workers, resume=True)
    assert resumed.start_iter == 3
    assert_same(outcome(out), reference)


def test_six_straight_with_two_workers_equals_no_workers(straight, tmp_path):
    # The augmentations are a function of the place in the stream, not of the worker.
    root, reference = straight
    train(root, tmp_path / "w2", 6, num_workers=2)
    assert_same(outcome(tmp_path / "w2"), reference)

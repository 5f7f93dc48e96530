"""Trainer pieces: schedule values, optimizer groups, NaN stop, resume, checkpoints."""

import json
import logging
import math

import pytest
import torch
from torch import nn

from detkit.config import to_dict
from detkit.engine.checkpoint import (
    CheckpointError,
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from detkit.engine.trainer import LRSchedule, Trainer, build_optimizer, check_output_dir
from detkit.errors import TrainingError
from detkit.schema import Config, TrainConfig
from detkit.structures import Geometry, ImageRecord, Target


def test_warmup_then_steps():
    s = LRSchedule(max_iter=100, warmup_iters=10, warmup_factor=0.1, kind="step", steps=[50, 80], gamma=0.1)
    assert s(0) == pytest.approx(0.1)  # starts at warmup_factor
    assert s(5) == pytest.approx(0.1 * 0.5 + 0.5)  # linear: 0.55 halfway
    assert s(10) == 1.0
    assert s(49) == 1.0
    assert s(50) == pytest.approx(0.1)
    assert s(80) == pytest.approx(0.01)


def test_cosine_schedule():
    s = LRSchedule(max_iter=100, warmup_iters=0, warmup_factor=1.0, kind="cosine", steps=[], gamma=0.1)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_norm_and_bias_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen parameters are not optimised at all
    opt = build_optimizer(model, TrainConfig(weight_decay=0.01))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[2].bias),
    }


def test_output_dir_with_a_run_is_protected(tmp_path):
    check_output_dir(tmp_path, resume=False)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TrainingError, match="already holds a run .*--resume"):
        check_output_dir(tmp_path, resume=False)
    check_output_dir(tmp_path, resume=True)


class _NaNAfter(nn.Module):
    """A 'detector' whose loss turns NaN at the given call."""

    size_divisibility = 1

    def __init__(self, bad_call: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, images, targets=None):
        self.calls += 1
        loss = (self.w * images.tensor.mean()).abs()
        if self.calls >= self.bad_call:
            loss = loss * float("nan")
        return [], {"loss_cls": loss}


class _TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=4):
        self.records = [ImageRecord(i, f"{i}.png", 8, 8) for i in range(n)]

    def __len__(self):
        return len(self.records)

    def aspect_ratios(self):
        import numpy as np

        return np.ones(len(self.records))

    def __getitem__(self, i):
        return torch.rand(3, 8, 8), Target(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_id=i, geometry=Geometry.identity(8, 8)
        )


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    cfg = Config()
    cfg.train = TrainConfig(max_iter=10, checkpoint_period=2, warmup_iters=0, device="cpu", log_period=1)
    cfg.data.batch_size = 2
    model = _NaNAfter(bad_call=4)
    trainer = Trainer(cfg, model, _TinyDataset(), None, tmp_path, ["a"], progress=False)
    with pytest.raises(TrainingError) as err:
        trainer.train()
    msg = str(err.value)
    assert "nan" in msg and "iteration 4" in msg and "model_0000002.pt" in msg
    assert "\n" not in msg
    assert not (tmp_path / "model_final.pt").exists()
    # The checkpoint on disk holds finite weights from before the bad step.
    state = load_checkpoint(tmp_path / "model_0000002.pt")
    assert torch.isfinite(state["model"]["w"]).all() and state["iteration"] == 2
    assert torch.isfinite(model.w).all()  # no update was applied with the NaN gradient


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    cfg = Config()
    cfg.train = TrainConfig(max_iter=4, checkpoint_period=2, warmup_iters=0, device="cpu", log_period=1)
    cfg.data.batch_size = 2
    Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], progress=False).train()
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_final.pt"
    cfg.train.max_iter = 6
    model = _NaNAfter(10**9)
    trainer = Trainer(cfg, model, _TinyDataset(), None, tmp_path, ["a"], resume=True, progress=False)
    assert trainer.start_iter == 4
    assert trainer.scheduler.last_epoch == 4  # the schedule resumes too
    trainer.train()
    assert model.calls == 2  # only iterations 5 and 6 ran
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Each session ends with its wall time.
    assert [r["iter"] for r in records if "train_minutes" in r] == [4, 6]


def test_checkpoints_are_atomic_and_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}, "config": to_dict(Config())})
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    assert load_checkpoint(path)["format"] == "detkit-1"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_loading_another_architecture_lists_the_mismatched_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_model_state(model, other, "other.pt")
    msg = str(err.value)
    assert "other.pt does not fit" in msg
    assert "missing 2: 1.weight, 1.bias" in msg
    assert "unexpected 2: 2.weight, 2.bias" in msg
    assert "shape mismatch 2: 0.weight (5, 4) vs (3, 4), 0.bias (5,) vs (3,)" in msg


def test_bare_state_dict_checkpoints_load(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    assert set(load_checkpoint(tmp_path / "bare.pt")["model"]) == {"w"}


def test_resume_follows_the_new_schedule(tmp_path):
    # A cosine schedule saved at max_iter 4 ends at lr 0; resumed with max_iter 8 the lr must
    # follow the new cosine (not the stored one, which would train at lr 0).
    cfg = Config()
    cfg.train = TrainConfig(max_iter=4, warmup_iters=0, lr_schedule="cosine", base_lr=0.1, device="cpu", log_period=1)
    cfg.data.batch_size = 2
    Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], progress=False).train()
    cfg.train.max_iter = 8
    trainer = Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], resume=True, progress=False)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    trainer.train()
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    assert all(lr > 0 for lr in lrs[4:7])


def test_evaluation_does_not_move_the_training_random_stream(tmp_path):
    """Validation-loss sampling draws random numbers; with eval_period the training losses
    must stay those of a run without it."""

    def losses(eval_period, out):
        torch.manual_seed(0)
        cfg = Config()
        cfg.train = TrainConfig(max_iter=4, warmup_iters=0, eval_period=eval_period, device="cpu", log_period=1)
        cfg.data.batch_size = 2
        model = _NaNAfter(10**9)
        trainer = Trainer(
            cfg,
            model,
            _TinyDataset(),
            _TinyDataset(),
            out,
            ["a"],
            evaluate_fn=lambda dets, ds: {"metric": "voc", "mAP": 0.0},
            progress=False,
        )
        # An "evaluation" that consumes the global RNG, as the validation loss does.
        trainer._evaluate = lambda it: (torch.rand(100), {"metric": "voc", "mAP": 0.0})[1]
        trainer.train()
        return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]

    assert losses(0, tmp_path / "a") == losses(1, tmp_path / "b")


def test_resume_drops_metrics_logged_after_the_last_checkpoint(tmp_path):
    # A run that crashed at iteration 3 logged iterations 1-3 but checkpointed only at 2; the
    # resumed run redoes iteration 3, so metrics.jsonl must hold each iteration once.
    cfg = Config()
    cfg.train = TrainConfig(max_iter=2, checkpoint_period=2, warmup_iters=0, device="cpu", log_period=1)
    cfg.data.batch_size = 2
    Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], progress=False).train()
    (tmp_path / "model_final.pt").rename(tmp_path / "model_0000002.pt")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"note": "no iteration"}) + "\n")
        f.write(json.dumps({"iter": 3, "loss": 1.0}) + "\n")
        f.write('{"iter": 4, "lo')  # cut off by the crash
    cfg.train.max_iter = 4
    Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], resume=True, progress=False).train()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] != 1.0 for r in records if "loss" in r)  # iteration 3 is the redone one
    assert {"note": "no iteration"} in records


def test_steps_past_max_iter_are_ignored_with_a_warning(tmp_path, caplog):
    # Shortening a recipe with train.max_iter alone must work (detectron2 does the same).
    cfg = Config()
    cfg.train = TrainConfig(max_iter=2, steps=[1, 480], gamma=0.5, warmup_iters=0, device="cpu", log_period=1)
    cfg.data.batch_size = 2
    with caplog.at_level(logging.WARNING, logger="detkit"):
        trainer = Trainer(cfg, _NaNAfter(10**9), _TinyDataset(), None, tmp_path, ["a"], progress=False)
    assert "train.steps [480] lie past max_iter 2 and are ignored" in caplog.text
    assert trainer.schedule(0) == 1.0 and trainer.schedule(1) == 0.5
    with pytest.raises(ValueError, match=r"steps must be positive iterations, got \[0, 5\]"):
        TrainConfig(max_iter=10, steps=[0, 5])

"""Trainer pieces: schedule values, optimizer groups, NaN stop, resume (bit-exact, following
the config, from the newest checkpoint), checkpoints (atomic, weights-only, one-line errors)."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from detkit.config import to_dict
from detkit.engine.checkpoint import (
    CheckpointError,
    atomic_write_text,
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    save_run_checkpoint,
)
from detkit.engine.trainer import (
    LRSchedule,
    SGDStage,
    Trainer,
    build_optimizer,
    check_output_dir,
    load_scaler_state,
)
from detkit.errors import TrainingError
from detkit.schema import Config, TrainConfig


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


def train(toy, cfg, model, out, **kw):
    run = toy.make_run(cfg, model, out, **kw)
    Trainer(run).train()
    return run


def losses_of(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, toy):
    cfg = toy.config(max_iter=10, checkpoint_period=2)
    model = toy.ToyDetector(nan_call=4)
    with pytest.raises(TrainingError) as err:
        train(toy, cfg, model, tmp_path)
    msg = str(err.value)
    assert "nan" in msg and "iteration 4" in msg and "model_0000002.pt" in msg
    assert "\n" not in msg
    assert not (tmp_path / "model_final.pt").exists()
    # The checkpoint on disk holds finite weights from before the bad step.
    state = load_checkpoint(tmp_path / "model_0000002.pt")
    assert torch.isfinite(state["model"]["w"]).all() and state["iteration"] == 2
    assert torch.isfinite(model.w).all()  # no update was applied with the NaN gradient


def _optimizer_tensors(state):
    return {(k, name): v for k, s in state["optimizer"]["state"].items() for name, v in s.items()}


def test_resume_continues_from_the_last_checkpoint_bit_for_bit(tmp_path, toy):
    straight = toy.ToyDetector()
    train(toy, toy.config(max_iter=6, checkpoint_period=2), straight, tmp_path / "straight")

    cfg = toy.config(max_iter=4, checkpoint_period=2)
    train(toy, cfg, toy.ToyDetector(), tmp_path / "split")
    assert find_last_checkpoint(tmp_path / "split") == tmp_path / "split" / "model_final.pt"
    cfg.train.max_iter = 6
    model = toy.ToyDetector()
    trainer = Trainer(toy.make_run(cfg, model, tmp_path / "split", resume=True))
    assert trainer.start_iter == 4
    assert trainer.scheduler.last_epoch == 4  # the schedule resumes too
    trainer.train()
    assert model.calls == 2  # only iterations 5 and 6 ran
    records = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Each session ends with its wall time.
    assert [r["iter"] for r in records if "train_minutes" in r] == [4, 6]
    # Resuming changed nothing: same losses, same weights and momentum buffers, bit for bit.
    assert losses_of(tmp_path / "split") == losses_of(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "model_final.pt")
    b = load_checkpoint(tmp_path / "split" / "model_final.pt")
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    oa, ob = _optimizer_tensors(a), _optimizer_tensors(b)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_follows_changed_lr_weight_decay_and_momentum(tmp_path, toy, caplog):
    # torch's optimizer/LambdaLR load_state_dict would bring back the old base_lr, weight decay
    # and momentum; the README promises that a resumed run follows its config.
    cfg = toy.config(max_iter=2, base_lr=0.1, weight_decay=1e-4, momentum=0.9, lr_schedule="cosine")
    train(toy, cfg, toy.ToyDetector(), tmp_path)
    cfg = toy.config(max_iter=4, base_lr=0.05, weight_decay=0.01, momentum=0.5, lr_schedule="cosine")
    with caplog.at_level(logging.INFO, logger="detkit"):
        trainer = Trainer(toy.make_run(cfg, toy.ToyDetector(), tmp_path, resume=True))
    decay, no_decay = trainer.optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay["momentum"] == no_decay["momentum"] == 0.5
    assert trainer.scheduler.base_lrs == [0.05, 0.05]
    assert decay["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert (
        "resume: the config changes train.base_lr 0.1 -> 0.05, train.weight_decay 0.0001 -> 0.01, "
        "train.momentum 0.9 -> 0.5; the config is followed" in caplog.text
    )
    # The momentum buffer itself is the run's state and is kept.
    assert trainer.optimizer.state[trainer.model.w]["momentum_buffer"] is not None
    trainer.train()
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    # lr recorded after iteration 3: the new cosine at step 3 of 4 times the new base_lr.
    assert lrs[2] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_an_empty_gradscaler_state_is_not_loaded():
    # A CPU or amp: false run saves a disabled GradScaler's state: {}. torch refuses to load
    # that into an enabled scaler (a resume on CUDA with AMP); there is nothing to restore.
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    with pytest.raises(RuntimeError):
        enabled.load_state_dict({})  # what the trainer did before
    load_scaler_state(enabled, {})
    assert enabled.get_scale() == 2.0**10
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    load_scaler_state(enabled, saved)
    assert enabled.get_scale() == 8.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, saved)  # AMP checkpoint resumed without AMP: ignored
    assert not disabled.is_enabled()


def test_stale_final_checkpoint_is_not_preferred_after_a_crash(tmp_path, toy):
    """Finish at 4, resume to 8 (checkpoints every 2), crash in iteration 7: model_final.pt
    (iteration 4) is older than model_0000006.pt, and the next resume must start at 6."""
    reference = tmp_path / "reference"
    train(toy, toy.config(max_iter=8, checkpoint_period=2), toy.ToyDetector(), reference)

    out = tmp_path / "run"
    cfg = toy.config(max_iter=4, checkpoint_period=2)
    train(toy, cfg, toy.ToyDetector(), out)
    cfg.train.max_iter = 8
    with pytest.raises(RuntimeError, match="killed at call 3"):
        train(toy, cfg, toy.ToyDetector(crash_call=3), out, resume=True)  # iterations 5, 6, crash in 7
    assert (out / "model_0000006.pt").is_file() and load_checkpoint(out / "model_final.pt")["iteration"] == 4
    assert find_last_checkpoint(out) == out / "model_0000006.pt"
    model = toy.ToyDetector()
    trainer = Trainer(toy.make_run(cfg, model, out, resume=True))
    assert trainer.start_iter == 6
    trainer.train()
    assert model.calls == 2
    assert losses_of(out) == losses_of(reference)
    assert torch.equal(
        load_checkpoint(out / "model_final.pt")["model"]["w"],
        load_checkpoint(reference / "model_final.pt")["model"]["w"],
    )


def test_find_last_checkpoint_without_the_marker_prefers_the_newest_iteration(tmp_path):
    # Folders written before last_checkpoint existed (or with the marker lost): by iteration.
    def ckpt(name, iteration):
        save_checkpoint(tmp_path / name, {"model": {"w": torch.ones(1)}, "iteration": iteration})

    assert find_last_checkpoint(tmp_path) is None
    ckpt("model_0000002.pt", 2)
    ckpt("model_0000006.pt", 6)
    ckpt("model_final.pt", 4)
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000006.pt"
    ckpt("model_final.pt", 6)  # a tie: the final one also holds later stages' state
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_final.pt"
    # The marker wins over iterations (it records the order of writing) ...
    save_run_checkpoint(tmp_path / "model_0000002.pt", {"model": {"w": torch.ones(1)}, "iteration": 2})
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pt\n"
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000002.pt"
    # ... unless the file it names is gone.
    (tmp_path / "model_0000002.pt").unlink()
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_final.pt"


def test_checkpoints_are_weights_only_with_one_line_errors(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}, "config": to_dict(Config())})
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    assert load_checkpoint(path)["format"] == "detkit-1"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert str(err.value) == (
        f"{tmp_path / 'evil.pt'} is not a detkit checkpoint: it holds Python objects other than tensors, "
        "which detkit refuses to load (files written by detkit never do)"
    )
    good = path.read_bytes()
    corrupt = {
        "junk.pt": b"not a checkpoint",
        "random.pt": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "truncated.pt": good[: len(good) // 2],
        "empty.pt": b"",
    }
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        # Never torch's advice to retry with weights_only=False (that would run the file's code).
        assert str(err.value) == (
            f"{tmp_path / name} is not a readable detkit checkpoint (corrupt, truncated, or not a torch file)"
        )
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_write_that_fails_halfway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model_final.pt", {"model": {"w": torch.ones(2)}, "iteration": 2})
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # the disk fills up halfway through the file
            fh.truncate(len(before) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iteration": 4})
    assert str(err.value) == f"cannot write checkpoint {path}: No space left on device (the previous file is kept)"
    assert path.read_bytes() == before  # a plain write into the file would have cut it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]  # no temporary file left


def test_atomic_text_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "run_state.json"
    atomic_write_text(path, "old\n")
    import os

    def fail(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"  # a plain write would have replaced it already
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_state.json"]


def test_resume_follows_the_new_schedule(tmp_path, toy):
    # A cosine schedule saved at max_iter 4 ends at lr 0; resumed with max_iter 8 the lr must
    # follow the new cosine (not the stored one, which would train at lr 0).
    cfg = toy.config(max_iter=4, lr_schedule="cosine", base_lr=0.1)
    train(toy, cfg, toy.ToyDetector(), tmp_path)
    cfg.train.max_iter = 8
    trainer = Trainer(toy.make_run(cfg, toy.ToyDetector(), tmp_path, resume=True))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    trainer.train()
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    assert all(lr > 0 for lr in lrs[4:7])


def test_evaluation_does_not_move_the_training_random_stream(tmp_path, toy):
    """Evaluation draws random numbers (validation-loss sampling, here the metric and the test
    images themselves); with eval_period the training losses must stay those of a run without."""

    def losses(eval_period, out):
        torch.manual_seed(0)
        cfg = toy.config(max_iter=4, eval_period=eval_period)
        draws = []

        def metric(dets, dataset):
            draws.append(torch.rand(100))
            return {"metric": "voc", "mAP": 0.0}

        run = toy.make_run(cfg, toy.ToyDetector(), out, test_set=toy.RandomImages(), evaluate_fn=metric)
        Trainer(run).train()
        assert len(draws) == (3 if eval_period else 0)  # at 1, 2, 3 (the final one is a stage)
        return losses_of(out)

    assert losses(0, tmp_path / "a") == losses(1, tmp_path / "b")


def test_resume_drops_metrics_logged_after_the_last_checkpoint(tmp_path, toy):
    # A run that crashed at iteration 3 logged iterations 1-3 but checkpointed only at 2; the
    # resumed run redoes iteration 3, so metrics.jsonl must hold each iteration once.
    cfg = toy.config(max_iter=2, checkpoint_period=2)
    train(toy, cfg, toy.ToyDetector(), tmp_path)
    (tmp_path / "model_final.pt").rename(tmp_path / "model_0000002.pt")
    (tmp_path / "last_checkpoint").write_text("model_0000002.pt\n")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"note": "no iteration"}) + "\n")
        f.write(json.dumps({"iter": 3, "loss": 1.0}) + "\n")
        f.write('{"iter": 4, "lo')  # cut off by the crash
    cfg.train.max_iter = 4
    train(toy, cfg, toy.ToyDetector(), tmp_path, resume=True)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] != 1.0 for r in records if "loss" in r)  # iteration 3 is the redone one
    assert {"note": "no iteration"} in records


def test_steps_past_max_iter_are_ignored_with_a_warning(tmp_path, toy, caplog):
    # Shortening a recipe with train.max_iter alone must work (detectron2 does the same).
    cfg = toy.config(max_iter=2, steps=[1, 480], gamma=0.5)
    with caplog.at_level(logging.WARNING, logger="detkit"):
        trainer = Trainer(toy.make_run(cfg, toy.ToyDetector(), tmp_path))
    assert "train.steps [480] lie past max_iter 2 and are ignored" in caplog.text
    assert trainer.schedule(0) == 1.0 and trainer.schedule(1) == 0.5
    with pytest.raises(ValueError, match=r"steps must be positive iterations, got \[0, 5\]"):
        TrainConfig(max_iter=10, steps=[0, 5])


def test_sgd_stage_is_done_when_the_newest_checkpoint_reaches_max_iter(tmp_path, toy):
    cfg = toy.config(max_iter=2)
    run = toy.make_run(cfg, toy.ToyDetector(), tmp_path)
    stage = SGDStage()
    assert not stage.done(run)
    stage.run(run)
    assert stage.done(run)
    cfg.train.max_iter = 3  # training further: no longer done
    assert not stage.done(run)


def test_log_lines_appear_without_a_progress_bar(tmp_path, toy, caplog):
    # --no-progress drops the bar only: the periodic log lines stay.
    cfg = toy.config(max_iter=4, log_period=2)
    with caplog.at_level(logging.INFO, logger="detkit"):
        train(toy, cfg, toy.ToyDetector(), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]


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


def test_resume_with_amp_from_a_checkpoint_trained_without_it(tmp_path, toy, monkeypatch):
    # The CUDA + AMP case on a CPU machine: a CPU GradScaler stands in for the CUDA one.
    cfg = toy.config(max_iter=2)
    train(toy, cfg, toy.ToyDetector(), tmp_path)
    assert load_checkpoint(tmp_path / "model_final.pt")["scaler"] == {}  # a disabled scaler's state
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True, init_scale=256.0))
    cfg.train.max_iter = 3
    trainer = Trainer(toy.make_run(cfg, toy.ToyDetector(), tmp_path, resume=True))  # torch would raise here
    assert trainer.start_iter == 2 and trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 256.0
    trainer.train()
    assert load_checkpoint(tmp_path / "model_final.pt")["scaler"]["scale"] == 256.0

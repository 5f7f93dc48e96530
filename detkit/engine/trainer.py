"""The SGD stage of a run: iteration-based training of a Detector with SGD + momentum +
weight decay, linear warmup, step or cosine schedule, optional gradient clipping, CUDA mixed
precision, seeded runs, atomic checkpoints, resume, periodic evaluation with validation
loss, ``metrics.jsonl`` (and TensorBoard).

The trainer only sums the loss dict the model returns (weights are the model's business:
a fine-tuning stage with another loss or sampling is another model head, not another loop)
and stops with ``TrainingError`` on a non-finite loss, before the optimiser step, so the
last checkpoint on disk is still a good one.

Resume: the model, optimizer, schedule position, GradScaler and the random state come from
the newest checkpoint; the hyperparameters come from the config the run is resumed with
(base_lr, weight_decay, momentum and the schedule: a changed value is followed and logged).
Data augmentation is seeded per sample from its place in the stream (detkit.data.loader), so
a resumed run sees the augmentations of an uninterrupted one, with any number of workers.

A run folder holds:
    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged iteration / evaluation
    model_XXXXXXX.pt periodic checkpoints; model_final.pt after the last stage
    last_checkpoint  the name of the newest checkpoint
    run_state.json   the stages finished (detkit.engine.stages)
    eval.json        the final evaluation ({"metric", "mAP", "per_class", ...})
    tensorboard/     with train.tensorboard: true
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detkit.config import to_dict
from detkit.data.loader import SkippedImages, build_train_loader
from detkit.engine.checkpoint import (
    checkpoint_iteration,
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_run_checkpoint,
)
from detkit.engine.inference import autocast_context, denormals_flushed
from detkit.engine.stages import RunContext, Stage, evaluate_on_test_set
from detkit.errors import TrainingError
from detkit.schema import TrainConfig

logger = logging.getLogger("detkit")


class LRSchedule:
    """lr factor at iteration ``it``: linear warmup from ``warmup_factor`` to 1 over
    ``warmup_iters``, times gamma^(steps passed) (step) or a half cosine to 0 (cosine)."""

    def __init__(self, max_iter: int, warmup_iters: int, warmup_factor: float, kind: str, steps, gamma: float):
        self.max_iter = int(max_iter)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.kind = kind
        self.steps = sorted(int(s) for s in steps)
        self.gamma = float(gamma)

    def __call__(self, it: int) -> float:
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / self.max_iter))
        else:
            factor = self.gamma ** sum(1 for s in self.steps if it >= s)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD; normalisation parameters and biases get no weight decay (decaying a BatchNorm
    scale only fights the normalisation)."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The files that mark a folder as holding a run (a new run never writes into such a folder).
RUN_FILES = ("config.yaml", "metrics.jsonl", "model_final.pt", "eval.json", "run_state.json", "last_checkpoint")


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """A folder that already holds a run is only reused with resume."""
    existing = [f for f in RUN_FILES if (out_dir / f).exists()] + [p.name for p in out_dir.glob("model_[0-9]*.pt")]
    if existing and not resume:
        raise TrainingError(
            f"output folder {out_dir} already holds a run ({', '.join(existing[:3])}); "
            "pass --resume to continue it or choose another --out"
        )


def load_scaler_state(scaler: torch.amp.GradScaler, state: Optional[Dict]) -> None:
    """Restore a GradScaler. A disabled one (CPU, or amp: false) saves ``{}``, and torch
    refuses to load that into an enabled one: a run resumed on CUDA with AMP from such a
    checkpoint starts with a fresh loss scale instead (there is no scale to restore)."""
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        logger.info("the checkpoint has no GradScaler state (trained without AMP): the loss scale starts afresh")


class Trainer:
    """The SGD loop over ``run.model`` and ``run.train_set`` (see the module doc); ``stage``
    names the stage in model_final.pt."""

    def __init__(self, run: RunContext, stage: str = "train"):
        self.run = run
        self.stage = stage
        self.cfg = run.cfg
        self.tcfg = t = run.cfg.train
        self.out_dir = run.out_dir
        if t.num_threads > 0:
            torch.set_num_threads(t.num_threads)
        assert run.device is not None
        self.device = run.device
        self.use_amp = run.use_amp
        seed_everything(t.seed)
        self.model = run.model.to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        late = [step for step in t.steps if step > t.max_iter]
        if late and t.lr_schedule == "step":
            logger.warning("train.steps %s lie past max_iter %d and are ignored", late, t.max_iter)
        self.schedule = self._new_schedule()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.skipped = SkippedImages("train", "another image of the same orientation takes its place")
        self.start_iter = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if run.resume:
            self._resume()

    def _new_schedule(self) -> LRSchedule:
        t = self.tcfg
        return LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)

    # -- checkpoints -----------------------------------------------------------------------
    def _training_state(self, iteration: int) -> Dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "rng": {
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            },
        }

    def save(self, iteration: int, final: bool = False) -> Path:
        if final:
            return self.run.save_final(self.stage, self._training_state(iteration))
        state = {
            **self._training_state(iteration),
            "model": self.model.state_dict(),
            "config": to_dict(self.cfg),
            "class_names": self.run.class_names,
            "stage": self.stage,
        }
        return save_run_checkpoint(self.out_dir / f"model_{iteration:07d}.pt", state)

    def _resume(self) -> None:
        path = find_last_checkpoint(self.out_dir)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.out_dir)
            self.run.metrics.trim(0)
            return
        state = load_checkpoint(path)
        load_model_state(self.model, state["model"], str(path))
        if "optimizer" in state:
            self._load_training_state(state)
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.start_iter = int(state.get("iteration", 0))
        self.run.metrics.trim(self.start_iter)
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    def _load_training_state(self, state: Dict) -> None:
        """Optimizer (momentum buffers), schedule position and loss scale from ``state``;
        base_lr, weight_decay, momentum and the schedule from the config (torch's
        load_state_dict would bring back the old run's values and silently keep them)."""
        t = self.tcfg
        configured = [(g["weight_decay"], g["momentum"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        groups = self.optimizer.param_groups  # new dicts after load_state_dict
        changes = []
        for key, old, new in (
            ("base_lr", self.scheduler.base_lrs[0], t.base_lr),
            ("weight_decay", groups[0]["weight_decay"], configured[0][0]),
            ("momentum", groups[0]["momentum"], configured[0][1]),
        ):
            if old != new:
                changes.append(f"train.{key} {old:g} -> {new:g}")
        for group, (weight_decay, momentum) in zip(groups, configured):
            group["weight_decay"], group["momentum"], group["initial_lr"] = weight_decay, momentum, t.base_lr
        self.scheduler.base_lrs = [t.base_lr] * len(groups)
        # LambdaLR's load_state_dict also wrote the old run's schedule fields (max_iter,
        # steps, ...) into our schedule object: a fresh one from the config replaces it.
        self.schedule = self._new_schedule()
        self.scheduler.lr_lambdas = [self.schedule] * len(groups)
        for group in groups:
            group["lr"] = t.base_lr * self.schedule(self.scheduler.last_epoch)
        if changes:
            logger.info("resume: the config changes %s; the config is followed", ", ".join(changes))
        load_scaler_state(self.scaler, state.get("scaler"))

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        """Train from ``start_iter`` to ``train.max_iter``, then save model_final.pt; sets
        ``run.results["train_minutes"]``."""
        with denormals_flushed(self.tcfg.flush_denormal):
            self._train()

    def _step(self, images, targets, it: int) -> Dict[str, torch.Tensor]:
        images = images.to(self.device)
        with autocast_context(self.device, self.use_amp):
            _, losses = self.model(images, targets)
        total = cast(torch.Tensor, sum(losses.values()))
        if not torch.isfinite(total):
            last = find_last_checkpoint(self.out_dir)
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise TrainingError(
                f"loss became {float(total.detach())} at iteration {it + 1} ({terms}); stopped before the update. "
                f"Last good checkpoint: {last if last else 'none'}. Try a lower train.base_lr or "
                "train.clip_grad_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.tcfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {**losses, "loss": total}

    def _train(self) -> None:
        t = self.tcfg
        loader = build_train_loader(
            self.run.train_set,
            self.cfg.data.batch_size,
            seed=t.seed,
            num_workers=self.cfg.data.num_workers,
            aspect_ratio_grouping=self.cfg.data.aspect_ratio_grouping,
            size_divisibility=cast(int, self.model.size_divisibility),
            start_batch=self.start_iter,
        )
        self.model.train()
        sums: Dict[str, float] = defaultdict(float)
        count, period_start, data_time = 0, time.perf_counter(), 0.0
        # disable=None: a bar only on a terminal; elsewhere (CI, nohup) and with --no-progress
        # one log line per log period instead.
        bar = tqdm(
            total=t.max_iter,
            initial=self.start_iter,
            desc=self.stage,
            dynamic_ncols=True,
            disable=None if self.run.progress else True,
        )
        data_iter = iter(loader)
        train_start = time.perf_counter()
        for it in range(self.start_iter, t.max_iter):
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            self.skipped.add(batch.skipped)
            images, targets = batch
            if images is None:
                logger.warning("iteration %d: no image of its batch could be read; the step is skipped", it + 1)
                self.scheduler.step()  # the schedule stays on the iteration count
            else:
                for k, v in self._step(images, targets, it).items():
                    sums[k] += float(v.detach())
                count += 1
            bar.update(1)
            done = it + 1
            if count and (done % max(t.log_period, 1) == 0 or done == t.max_iter):
                elapsed = time.perf_counter() - period_start
                record = {"iter": done, "lr": self.optimizer.param_groups[0]["lr"]}
                record.update({k: v / count for k, v in sums.items()})
                record["s_per_iter"] = elapsed / count
                record["data_s_per_iter"] = data_time / count
                record["eta_s"] = record["s_per_iter"] * (t.max_iter - done)
                self.run.metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.4g}")
                if bar.disable:
                    logger.info(
                        "iter %d/%d  loss %.4f  lr %.4g  %.3f s/iter  eta %.0f s",
                        done,
                        t.max_iter,
                        record["loss"],
                        record["lr"],
                        record["s_per_iter"],
                        record["eta_s"],
                    )
                sums.clear()
                count, period_start, data_time = 0, time.perf_counter(), 0.0
            if t.checkpoint_period and done % t.checkpoint_period == 0 and done != t.max_iter:
                self.save(done)
            if t.eval_period and done % t.eval_period == 0 and done != t.max_iter:
                res = evaluate_on_test_set(self.run, done)
                if res is not None:
                    message = f"iter {done}: {res['metric']} mAP {res['mAP']:.4f}"
                    if bar.disable:
                        logger.info(message)
                    else:
                        bar.write(message)
                self.model.train()
        bar.close()
        # Wall time of this session's iterations, periodic evaluations included.
        train_minutes = (time.perf_counter() - train_start) / 60
        self.run.metrics.log({"iter": t.max_iter, "train_minutes": train_minutes})
        summary = self.skipped.summary()
        if summary:
            logger.warning(summary)
        self.save(t.max_iter, final=True)
        self.run.results["train_minutes"] = train_minutes


class SGDStage(Stage):
    """Gradient training of the whole model (``Trainer``); done when the newest checkpoint
    is at ``train.max_iter`` or later, resumed from it otherwise."""

    changes_model = True

    def __init__(self, name: str = "train"):
        self.name = name

    def done(self, run: RunContext) -> bool:
        path = find_last_checkpoint(run.out_dir)
        return path is not None and checkpoint_iteration(path) >= run.cfg.train.max_iter

    def run(self, run: RunContext) -> None:
        Trainer(run, stage=self.name).train()

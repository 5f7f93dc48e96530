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

Distributed (torchrun; ``detkit.engine.distributed``): every rank trains a DDP copy of the
model on its B = data.batch_size images of each global batch of B x W (the same images and
augmentations one process sees with a batch of B x W); gradients are averaged, so
``train.base_lr`` is the learning rate of the global batch. ``norm: syncbn`` layers become
synchronised BatchNorm. Each rank draws its own random stream (RPN / RoI sampling) from
``rank_seed``; a checkpoint keeps every rank's random state, the world size and the global
batch. Resume works with any world size: with the same one it is exact; with another the
data stream is the same iteration's of the new global batch (the same stream when the
global batch is unchanged) and the other ranks' random streams start afresh (logged).
Checkpoints, metrics and the progress bar are rank 0's; a non-finite loss or an unreadable
batch on any rank is agreed on by all ranks, so they stop, or skip the step, together.

Mixed precision (``train.amp``): bfloat16 autocast where the GPU supports it, else float16
with a GradScaler (``detkit.engine.inference.amp_dtype``); on CUDA the batches come in
pinned memory. With ``train.channels_last`` the model and images are channels-last (on the
CPU too, strided 1x1 convolutions excepted: ``detkit.modeling.layout``).

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

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detkit.config import to_dict
from detkit.data.loader import SkippedImages, build_train_loader
from detkit.engine import distributed
from detkit.engine.checkpoint import (
    checkpoint_iteration,
    find_last_checkpoint,
    load_checkpoint,
    load_model_state,
    save_run_checkpoint,
)
from detkit.engine.inference import autocast_context, denormals_flushed, images_to, needs_grad_scaler
from detkit.engine.stages import RunContext, Stage, evaluate_on_test_set
from detkit.errors import TrainingError
from detkit.modeling.layout import to_channels_last
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


@contextlib.contextmanager
def _unused_parameters_named(it: int) -> Iterator[None]:
    """DDP's reducer refuses a trainable parameter that got no gradient (a branch the
    iteration skipped), in the backward pass or at the next forward: one line that says
    which setting allows it."""
    try:
        yield
    except RuntimeError as exc:
        if "find_unused_parameters" in str(exc) or "finished reduction" in str(exc):
            raise TrainingError(
                f"iteration {it + 1}: some trainable parameters received no gradient, which DDP cannot average; "
                "set train.find_unused_parameters=true"
            ) from None
        raise


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
        self.amp_dtype = run.amp_dtype
        self.use_amp = self.amp_dtype is not None
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        seed_everything(distributed.rank_seed(t.seed, self.rank))
        self.model = run.model.to(self.device)
        # Channels-last images and weights (tensor cores on CUDA, oneDNN on the CPU, where the
        # strided 1x1 convolutions stay NCHW: modeling.layout says why).
        self.channels_last = bool(t.channels_last)
        if self.channels_last:
            routed = to_channels_last(self.model, self.device)
            if routed:
                logger.info("channels-last training; %d strided 1x1 convolutions kept in NCHW", routed)
        distributed.check_syncbn(self.model)
        converted = distributed.convert_sync_batchnorm(self.model, self.device) if self.world_size > 1 else 0
        if converted:
            logger.info("norm: syncbn: %d BatchNorm layers synchronised over %d processes", converted, self.world_size)
        self.optimizer = build_optimizer(self.model, t)
        late = [step for step in t.steps if step > t.max_iter]
        if late and t.lr_schedule == "step":
            logger.warning("train.steps %s lie past max_iter %d and are ignored", late, t.max_iter)
        self.schedule = self._new_schedule()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(self.amp_dtype))
        self.skipped = SkippedImages("train", "another image of the same orientation takes its place")
        self.start_iter = 0
        self.global_batch = run.cfg.data.batch_size * self.world_size
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if run.resume:
            self._resume()
        # After resume: DDP starts from rank 0's weights and buffers (broadcast when wrapped).
        self.train_model = distributed.wrap_ddp(self.model, self.device, t.find_unused_parameters)

    def _new_schedule(self) -> LRSchedule:
        t = self.tcfg
        return LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)

    # -- checkpoints -----------------------------------------------------------------------
    def _rng_state(self) -> Dict:
        """This process's random state. In a distributed run, every rank's (rank r at
        ``ranks[r]``; a collective, so every rank calls it), rank 0's also at the top level."""
        own = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        elif torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
        if self.world_size == 1:
            return own
        ranks = distributed.gather_to_main(own, "gathering the random states for a checkpoint")
        return {**own, "ranks": ranks}

    def _training_state(self, iteration: int) -> Dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "rng": self._rng_state(),
            "world_size": self.world_size,
            "global_batch": self.global_batch,
        }

    def save(self, iteration: int, final: bool = False) -> Path:
        """A checkpoint (every rank calls it; rank 0 writes)."""
        training_state = self._training_state(iteration)
        if final:
            return self.run.save_final(self.stage, training_state)
        path = self.out_dir / f"model_{iteration:07d}.pt"
        if not self.main:
            return path
        state = {
            **training_state,
            "model": self.model.state_dict(),
            "config": to_dict(self.cfg),
            "class_names": self.run.class_names,
            "stage": self.stage,
        }
        return save_run_checkpoint(path, state)

    def _resume(self) -> None:
        def read():  # rank 0 reads the newest checkpoint and hands it to every rank
            path = find_last_checkpoint(self.out_dir)
            return (path, load_checkpoint(path)) if path is not None else (None, None)

        path, state = distributed.on_main(read, "reading the checkpoint to resume from")
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.out_dir)
            self.run.metrics.trim(0)
            return
        load_model_state(self.model, state["model"], str(path))
        if "optimizer" in state:
            self._load_training_state(state)
        self.start_iter = int(state.get("iteration", 0))
        self._restore_rng(state.get("rng", {}), int(state.get("world_size", 1)))
        saved_batch = state.get("global_batch")
        if saved_batch is not None and int(saved_batch) != self.global_batch:
            logger.warning(
                "resume: the global batch changes from %d to %d images (data.batch_size x %d processes): the "
                "data stream is the new batch's from iteration %d on, and train.base_lr (for the global batch) "
                "is used as configured",
                saved_batch,
                self.global_batch,
                self.world_size,
                self.start_iter,
            )
        self.run.metrics.trim(self.start_iter)
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    def _restore_rng(self, rng: Dict, saved_world: int) -> None:
        """Every rank's random state when the world size is the one saved (exact resume);
        otherwise rank 0 continues rank 0's and the other ranks start fresh streams."""
        ranks = rng.get("ranks")
        if saved_world == self.world_size and ranks:
            own = ranks[self.rank]
        elif self.rank == 0:
            own = rng
        else:
            own = {}
            seed_everything(distributed.rank_seed(self.tcfg.seed, self.rank, self.start_iter))
        if saved_world != self.world_size and self.main:
            logger.info(
                "resume: %d processes now, %d before: ranks 1+ start new random streams (anchor / RoI sampling)",
                self.world_size,
                saved_world,
            )
        if "torch" in own:
            torch.set_rng_state(own["torch"])
        cuda = own.get("cuda")
        if cuda is None:
            return
        if self.device.type == "cuda" and isinstance(cuda, torch.Tensor):
            torch.cuda.set_rng_state(cuda, self.device)
        elif isinstance(cuda, (list, tuple)) and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

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
        images = images_to(images, self.device, self.channels_last)
        with distributed.collective(f"iteration {it + 1}"), _unused_parameters_named(it):
            with autocast_context(self.device, self.amp_dtype):
                _, losses = self.train_model(images, targets)
        total = cast(torch.Tensor, sum(losses.values()))
        problem = None
        if not torch.isfinite(total):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            problem = f"loss became {float(total.detach())} at iteration {it + 1} ({terms})"
        # Every rank stops, before the update, when any rank's loss is not finite.
        failure = distributed.first_failure(problem, f"checking the losses of iteration {it + 1}")
        if failure is not None:
            failed_rank, problem = failure
            where = f" on rank {failed_rank}" if self.world_size > 1 else ""
            last = distributed.on_main(lambda: find_last_checkpoint(self.out_dir))
            raise TrainingError(
                f"{problem}{where}; stopped before the update. "
                f"Last good checkpoint: {last if last else 'none'}. Try a lower train.base_lr or "
                "train.clip_grad_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with distributed.collective(f"the backward pass of iteration {it + 1}"), _unused_parameters_named(it):
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
            rank=self.rank,
            world_size=self.world_size,
            pin_memory=self.device.type == "cuda",
        )
        if self.main and self.world_size > 1:
            logger.info(
                "global batch %d = data.batch_size %d x %d processes; train.base_lr %g is for it",
                self.global_batch,
                self.cfg.data.batch_size,
                self.world_size,
                t.base_lr,
            )
        self.train_model.train()
        sums: Dict[str, float] = defaultdict(float)
        count, period_start, data_time = 0, time.perf_counter(), 0.0
        # disable=None: a bar only on a terminal; elsewhere (CI, nohup) and with --no-progress
        # one log line per log period instead.
        bar = tqdm(
            total=t.max_iter,
            initial=self.start_iter,
            desc=self.stage,
            dynamic_ncols=True,
            disable=None if self.run.progress and self.main else True,
        )
        data_iter = iter(loader)
        train_start = time.perf_counter()
        for it in range(self.start_iter, t.max_iter):
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            self.skipped.add(batch.skipped)
            images, targets = batch
            # A rank without images skips the step, and so must every other (DDP steps together).
            skip = images is None
            if self.world_size > 1:
                skip = distributed.any_rank(skip, f"the start of iteration {it + 1}")
            if skip:
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
                means = {k: v / count for k, v in sums.items()}
                if self.world_size > 1:  # the losses of the global batch: the mean over the ranks
                    keys = sorted(means)  # the same order on every rank
                    totals = distributed.all_reduce_sum([means[k] for k in keys], "averaging the logged losses")
                    averaged = dict(zip(keys, totals))
                    means = {k: averaged[k] / self.world_size for k in means}
                record.update(means)
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
                self.train_model.train()
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

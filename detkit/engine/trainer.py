"""Iteration-based training of a Detector: SGD + momentum + weight decay, linear warmup,
step or cosine schedule, optional gradient clipping, CUDA mixed precision, seeded runs,
atomic checkpoints, resume, periodic evaluation with validation loss, ``metrics.jsonl``.

The trainer only sums the loss dict the model returns (weights are the model's business)
and stops with ``TrainingError`` on a non-finite loss, before the optimiser step, so the
last checkpoint on disk is still a good one.

A run folder holds:
    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged iteration / evaluation
    model_XXXXXXX.pt periodic checkpoints; model_final.pt at the end
    eval.json        the final evaluation ({"metric", "mAP", "per_class", ...})
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detkit.config import to_dict
from detkit.data.loader import build_train_loader
from detkit.engine.checkpoint import find_last_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from detkit.engine.inference import autocast_context, device_from_config, run_inference
from detkit.errors import TrainingError
from detkit.schema import Config, TrainConfig

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
    decay, no_decay = [], []
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


RUN_FILES = ("config.yaml", "metrics.jsonl", "model_final.pt", "eval.json")


def _record_iter(line: str) -> float:
    """The iteration a metrics.jsonl line belongs to. A line cut off by a crash counts as
    past every checkpoint (a resume drops it); a record without an iteration is kept."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf")
    it = record.get("iter") if isinstance(record, dict) else None
    return float(it) if isinstance(it, (int, float)) else float("-inf")


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """A folder that already holds a run is only reused with resume."""
    existing = [f for f in RUN_FILES if (out_dir / f).exists()] + [p.name for p in out_dir.glob("model_[0-9]*.pt")]
    if existing and not resume:
        raise TrainingError(
            f"output folder {out_dir} already holds a run ({', '.join(existing[:3])}); "
            "pass --resume to continue it or choose another --out"
        )


class Trainer:
    """model: a Detector; train_set / test_set: DetectionDatasets with transforms set;
    evaluate_fn(dets, dataset) -> result dict (from detkit.evaluation)."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_set,
        test_set,
        out_dir,
        class_names: List[str],
        evaluate_fn=None,
        resume: bool = False,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        self.train_set = train_set
        self.test_set = test_set
        self.evaluate_fn = evaluate_fn
        self.progress = progress
        if self.tcfg.num_threads > 0:
            torch.set_num_threads(self.tcfg.num_threads)
        self.device = device_from_config(self.tcfg.device)
        self.use_amp = self.tcfg.amp and self.device.type == "cuda"
        seed_everything(self.tcfg.seed)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        t = self.tcfg
        late = [step for step in t.steps if step > t.max_iter]
        if late and t.lr_schedule == "step":
            logger.warning("train.steps %s lie past max_iter %d and are ignored", late, t.max_iter)
        self.schedule = LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_iter = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self, iteration: int) -> Dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "config": to_dict(self.cfg),
            "class_names": self.class_names,
            "rng": {
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            },
        }

    def save(self, iteration: int, final: bool = False) -> Path:
        name = "model_final.pt" if final else f"model_{iteration:07d}.pt"
        return save_checkpoint(self.out_dir / name, self._state(iteration))

    def _resume(self) -> None:
        path = find_last_checkpoint(self.out_dir)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.out_dir)
            self._trim_metrics(0)
            return
        state = load_checkpoint(path)
        load_model_state(self.model, state["model"], str(path))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            # LambdaLR's load_state_dict writes the old run's schedule fields (max_iter,
            # steps, ...) into our schedule object; a resumed run follows the schedule of the
            # config it was resumed with, so a fresh one replaces it.
            t = self.tcfg
            self.schedule = LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)
            self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self.schedule(self.scheduler.last_epoch)
            self.scaler.load_state_dict(state.get("scaler", {}))
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.start_iter = int(state.get("iteration", 0))
        self._trim_metrics(self.start_iter)
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    def _trim_metrics(self, last_iter: int) -> None:
        """Drop metrics.jsonl records past ``last_iter``: a crashed run logged iterations
        after its last checkpoint, and the resumed run trains (and logs) them again."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _record_iter(line) <= last_iter]
        if len(kept) < len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line.rstrip("\n") + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
            logger.info(
                "metrics.jsonl: dropped %d records after iteration %d (they are redone)",
                len(lines) - len(kept),
                last_iter,
            )

    # -- logging -----------------------------------------------------------------------------
    def _log(self, record: Dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, iteration: int) -> Optional[Dict]:
        if self.test_set is None or self.evaluate_fn is None:
            return None
        # Evaluation (validation-loss sampling) must not move the training RNG: a run with
        # eval_period and a resumed run then see the same random stream as a plain run.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(iteration)

    def _evaluate(self, iteration: int) -> Dict:
        dets, val_losses, sec_per_img = run_inference(
            self.model,
            self.test_set,
            self.cfg.data.test_batch_size,
            self.device,
            self.cfg.data.num_workers,
            compute_losses=True,
            amp=self.use_amp,
            progress=self.progress,
        )
        result = self.evaluate_fn(dets, self.test_set)
        record = {
            "iter": iteration,
            "eval_metric": result["metric"],
            "eval_mAP": result["mAP"],
            "eval_s_per_img": sec_per_img,
        }
        record.update({f"val_{k}": v for k, v in val_losses.items()})
        if val_losses:
            record["val_loss"] = sum(val_losses.values())
        self._log(record)
        result["s_per_img"] = sec_per_img
        result["dets"] = dets
        return result

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Optional[Dict]:
        t = self.tcfg
        loader = build_train_loader(
            self.train_set,
            self.cfg.data.batch_size,
            seed=t.seed,
            num_workers=self.cfg.data.num_workers,
            aspect_ratio_grouping=self.cfg.data.aspect_ratio_grouping,
            size_divisibility=getattr(self.model, "size_divisibility", 32),
            start_batch=self.start_iter,
        )
        self.model.train()
        sums: Dict[str, float] = defaultdict(float)
        count, period_start, data_time = 0, time.perf_counter(), 0.0
        # disable=None: a bar only on a terminal; elsewhere (CI, nohup) one log line per period.
        bar = tqdm(
            total=t.max_iter,
            initial=self.start_iter,
            desc="train",
            dynamic_ncols=True,
            disable=None if self.progress else True,
        )
        data_iter = iter(loader)
        train_start = time.perf_counter()
        for it in range(self.start_iter, t.max_iter):
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            data_time += time.perf_counter() - t0
            images = images.to(self.device)
            with autocast_context(self.device, self.use_amp):
                _, losses = self.model(images, targets)
            total = sum(losses.values())
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
            if t.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            for k, v in losses.items():
                sums[k] += float(v.detach())
            sums["loss"] += float(total.detach())
            count += 1
            bar.update(1)
            done = it + 1
            if done % max(t.log_period, 1) == 0 or done == t.max_iter:
                elapsed = time.perf_counter() - period_start
                record = {"iter": done, "lr": self.optimizer.param_groups[0]["lr"]}
                record.update({k: v / count for k, v in sums.items()})
                record["s_per_iter"] = elapsed / count
                record["data_s_per_iter"] = data_time / count
                record["eta_s"] = record["s_per_iter"] * (t.max_iter - done)
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.4g}")
                if bar.disable and self.progress:
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
                res = self.evaluate(done)
                if res is not None:
                    bar.write(f"iter {done}: {res['metric']} mAP {res['mAP']:.4f}")
                self.model.train()
        bar.close()
        # Wall time of this session's iterations, periodic evaluations included.
        train_minutes = (time.perf_counter() - train_start) / 60
        self._log({"iter": t.max_iter, "train_minutes": train_minutes})
        self.save(t.max_iter, final=True)
        result = self.evaluate(t.max_iter)
        if result is not None:
            result["train_minutes"] = train_minutes
        return result

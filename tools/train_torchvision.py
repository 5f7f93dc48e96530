"""Train torchvision's Faster R-CNN with the recipe of a detkit config, for comparison.

    python tools/train_torchvision.py configs/faster_rcnn/bccd_r18_fpn.yaml --out DIR [key=value ...]

Same datasets and class list, backbone (``tools/torchvision_baseline.py``), input
sizes, flips, batch size, aspect-ratio grouping, seed, optimiser (SGD, the same parameter
groups), warmup and schedule, gradient clipping, iterations, denormal flushing, mixed
precision (``train.amp_dtype: bf16`` on the CPU: autocast in training and testing, as
detkit); evaluated by detkit's evaluator. The training stream is detkit's own (``detkit.data.loader``): the same
batches in the same order, each sample's augmentation seeded from its place in the stream, so
with a single training size both frameworks see the same images with the same flips.
torchvision resizes and normalises inside its model; the data pipeline here only jitters
(when the config asks) and flips.

Writes DIR/{config.yaml, metrics.jsonl, model_final.pt, eval.json, detections.json} like
``detkit train``; eval.json also holds ``train_minutes`` and ``torchvision_deviations``: the
config settings torchvision hard-codes otherwise (``recipe_deviations``), also printed.

There is no resume: ``--restart`` starts an interrupted run (a DIR without eval.json) again
from scratch, replacing its files; a finished run is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("detkit")

# What this script writes into a run folder (``--restart`` removes exactly these).
OUTPUTS = ("config.yaml", "metrics.jsonl", "model_final.pt", "eval.json", "detections.json")


class ListCollate:
    """LoadedSample list -> (images, targets, failures): torchvision takes lists of
    differently sized images; samples whose image (and every substitute) failed are left out."""

    def __call__(self, samples):
        images, targets, failures = [], [], []
        for s in samples:
            failures += s.failures
            if s.image is not None:
                images.append(s.image)
                targets.append(s.target)
        return images, targets, failures


def torchvision_train_transforms(cfg):
    """detkit's training pipeline without resize and normalisation (torchvision's model does
    both): the photometric jitter and the flips, in detkit's order, so that a sample draws the
    same random numbers as in detkit (with a single training size, where resizing draws none)."""
    from detkit.data.build import dataset_transforms
    from detkit.data.transforms import ColorJitter, Compose, RandomHorizontalFlip, RandomVerticalFlip

    steps = dataset_transforms(cfg.data.input, train=True).transforms
    return Compose([s for s in steps if isinstance(s, (ColorJitter, RandomHorizontalFlip, RandomVerticalFlip))])


def build_torchvision_train_loader(cfg, train_set):
    """detkit's training stream (``detkit.data.loader.build_train_loader``: the same seeded
    batch order, per-sample augmentation seeds and substitutes for unreadable images) as lists
    of unpadded images: batches of (images, targets, failed reads)."""
    import torch
    from torch.utils.data import DataLoader

    from detkit.data.loader import GroupedBatchSampler, NumberedBatches, SampleReader

    t = cfg.train
    sampler = GroupedBatchSampler(
        train_set.aspect_ratios(), cfg.data.batch_size, t.seed, cfg.data.aspect_ratio_grouping
    )
    return DataLoader(
        SampleReader(train_set, seed=t.seed, groups=sampler.groups),
        batch_sampler=NumberedBatches(sampler),
        collate_fn=ListCollate(),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed),
    )


def prepare_out_dir(out: Path, restart: bool) -> None:
    """A folder with a finished run (eval.json) is refused; an interrupted one only with
    ``restart`` (then its files are removed); anything else holding a run is refused."""
    from detkit.engine.trainer import check_output_dir
    from detkit.errors import TrainingError

    if restart and out.is_dir():
        if (out / "eval.json").exists():
            raise TrainingError(f"{out} holds a finished run (eval.json); --restart only replaces interrupted runs")
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    check_output_dir(out, resume=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--restart", action="store_true", help="start an interrupted run in --out again from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from torchvision_baseline import UnsupportedByTorchvision

    from detkit.engine.inference import denormals_flushed
    from detkit.errors import DetkitError
    from detkit.schema import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        # Before any tensor work, as `detkit train` does: torch's thread pool inherits the mode.
        with denormals_flushed(cfg.train.flush_denormal):
            return train(cfg, Path(args.out), args.restart, progress=not args.no_progress)
    except (DetkitError, UnsupportedByTorchvision) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(cfg, out: Path, restart: bool = False, progress: bool = True) -> int:
    import torch
    from torchvision_baseline import build_torchvision_model, recipe_deviations, set_torchvision_mode
    from tqdm import tqdm

    from detkit.config import dump_config
    from detkit.data.build import build_datasets
    from detkit.data.loader import SkippedImages, build_test_loader
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.engine.evaluate import evaluate_detections, summary_lines, write_evaluation
    from detkit.engine.inference import amp_dtype, autocast_context
    from detkit.engine.trainer import LRSchedule, build_optimizer, seed_everything
    from detkit.errors import TrainingError

    prepare_out_dir(out, restart)
    t = cfg.train
    train_set, test_set, classes = build_datasets(cfg)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    cfg.data.classes = list(classes)
    deviations = recipe_deviations(cfg)
    for line in deviations:
        logger.warning("torchvision cannot follow the config: %s", line)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    train_set.transforms = torchvision_train_transforms(cfg)
    test_set.transforms = None
    seed_everything(t.seed)
    model = build_torchvision_model(cfg, len(classes))
    # Mixed precision as detkit's trainer and evaluation apply it (train.amp / amp_dtype: on
    # the CPU bf16 autocast only when asked for), in training and at test time.
    cpu = torch.device("cpu")
    amp = amp_dtype(cpu, t.amp, t.amp_dtype)
    optimizer = build_optimizer(model, t)
    schedule = LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = build_torchvision_train_loader(cfg, train_set)
    skipped = SkippedImages("train", "another image of the same orientation takes its place")
    set_torchvision_mode(model, True)
    data = iter(loader)
    log = open(out / "metrics.jsonl", "a", encoding="utf-8")
    start = time.perf_counter()
    period = time.perf_counter()
    sums: dict = {}
    count = 0
    for it in tqdm(range(t.max_iter), desc="torchvision train", dynamic_ncols=True, disable=None if progress else True):
        images, targets, failures = next(data)
        skipped.add(failures)
        if not images:
            logger.warning("iteration %d: no image of its batch could be read; the step is skipped", it + 1)
            scheduler.step()
            continue
        tv_targets = []
        for tg in targets:
            keep = ~tg.difficult if not cfg.model.train_difficult else torch.ones_like(tg.difficult)
            tv_targets.append({"boxes": tg.boxes[keep], "labels": tg.labels[keep]})
        with autocast_context(cpu, amp):
            losses = model(images, tv_targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise TrainingError(f"loss became {float(total.detach())} at iteration {it + 1} ({terms})")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if t.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
        count += 1
        if count and ((it + 1) % max(t.log_period, 1) == 0 or it + 1 == t.max_iter):
            rec = {
                "iter": it + 1,
                "lr": optimizer.param_groups[0]["lr"],
                **{k: v / count for k, v in sums.items()},
                "s_per_iter": (time.perf_counter() - period) / count,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            sums, count, period = {}, 0, time.perf_counter()
    train_minutes = (time.perf_counter() - start) / 60
    log.write(json.dumps({"iter": t.max_iter, "train_minutes": train_minutes}) + "\n")
    log.flush()
    summary = skipped.summary()
    if summary:
        logger.warning(summary)
    save_checkpoint(
        out / "model_final.pt",
        {"model": model.state_dict(), "class_names": list(classes), "iteration": t.max_iter, "source": "torchvision"},
    )
    set_torchvision_mode(model, False)
    dets = {}
    # detkit's test loader (no transforms, batch 1, no padding: size_divisibility 1) reads the
    # original images, as run_inference does for detkit; unreadable ones are left out.
    test_loader = build_test_loader(test_set, 1, cfg.data.num_workers, size_divisibility=1, skip_unreadable=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(test_loader, desc="torchvision eval", dynamic_ncols=True, disable=None if progress else True):
            images, _ = batch
            if images is None:
                continue
            with autocast_context(cpu, amp):
                o = model([images.tensor[0]])[0]
            dets[images.image_ids[0]] = {
                "boxes": o["boxes"].float().numpy(),
                "scores": o["scores"].float().numpy(),
                "labels": o["labels"].numpy(),
            }
    sec = (time.perf_counter() - t0) / max(len(test_set), 1)
    result = evaluate_detections(cfg.test, dets, test_set)
    result["s_per_img"] = sec
    result["train_minutes"] = train_minutes
    result["torchvision_deviations"] = deviations
    write_evaluation(result, dets, test_set, out)
    log.write(
        json.dumps(
            {"iter": t.max_iter, "eval_metric": result["metric"], "eval_mAP": result["mAP"], "eval_s_per_img": sec}
        )
        + "\n"
    )
    log.close()
    print(summary_lines(result))
    print(f"torchvision: {train_minutes:.1f} min training, {sec:.3f} s/img at test; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train torchvision's Faster R-CNN with the recipe of a detkit config, for comparison.

    python tools/train_torchvision.py configs/faster_rcnn/bccd_r18_fpn.yaml --out DIR [key=value ...]

Same datasets and class list, backbone (``tools/torchvision_baseline.py``), input
sizes, flips, batch size, aspect-ratio grouping, seed, optimiser (SGD, the same parameter
groups), warmup and schedule, iterations; evaluated by detkit's evaluator. Writes
DIR/{config.yaml, metrics.jsonl, model_final.pt, eval.json} like ``detkit train``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader
    from torchvision_baseline import build_torchvision_model, set_torchvision_mode
    from tqdm import tqdm

    from detkit.config import dump_config
    from detkit.data.build import build_datasets
    from detkit.data.loader import GroupedBatchSampler
    from detkit.data.transforms import Compose, RandomHorizontalFlip
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.engine.evaluate import evaluate_detections
    from detkit.engine.trainer import LRSchedule, build_optimizer, check_output_dir, seed_everything
    from detkit.evaluation.report import format_table, write_result
    from detkit.schema import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    out = Path(args.out)
    check_output_dir(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    train_set, test_set, classes = build_datasets(cfg)
    cfg.data.classes = list(classes)
    dump_config(cfg, out / "config.yaml")
    # torchvision resizes and normalises inside the model: the data pipeline only flips.
    train_set.transforms = Compose([RandomHorizontalFlip(cfg.data.input.flip_prob)])
    test_set.transforms = None
    seed_everything(t.seed)
    model = build_torchvision_model(cfg, len(classes))
    optimizer = build_optimizer(model, t)
    schedule = LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sampler = GroupedBatchSampler(
        train_set.aspect_ratios(), cfg.data.batch_size, t.seed, cfg.data.aspect_ratio_grouping
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=lambda b: ([x[0] for x in b], [x[1] for x in b]),
    )
    set_torchvision_mode(model, True)
    data = iter(loader)
    log = open(out / "metrics.jsonl", "a", encoding="utf-8")
    start = time.perf_counter()
    period = time.perf_counter()
    sums = {}
    for it in tqdm(range(t.max_iter), desc="torchvision train", dynamic_ncols=True):
        images, targets = next(data)
        tv_targets = []
        for tg in targets:
            keep = ~tg.difficult if not cfg.model.train_difficult else torch.ones_like(tg.difficult)
            tv_targets.append({"boxes": tg.boxes[keep], "labels": tg.labels[keep]})
        losses = model(images, tv_targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if t.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
        if (it + 1) % t.log_period == 0 or it + 1 == t.max_iter:
            n = t.log_period if (it + 1) % t.log_period == 0 else (it + 1) % t.log_period
            rec = {
                "iter": it + 1,
                "lr": optimizer.param_groups[0]["lr"],
                **{k: v / n for k, v in sums.items()},
                "s_per_iter": (time.perf_counter() - period) / n,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            sums, period = {}, time.perf_counter()
    train_time = time.perf_counter() - start
    save_checkpoint(
        out / "model_final.pt",
        {"model": model.state_dict(), "class_names": list(classes), "iteration": t.max_iter, "source": "torchvision"},
    )
    set_torchvision_mode(model, False)
    dets = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(len(test_set)), desc="torchvision eval", dynamic_ncols=True):
            image, target = test_set[i]
            o = model([image])[0]
            dets[target.image_id] = {k: o[k].numpy() for k in ("boxes", "scores", "labels")}
    sec = (time.perf_counter() - t0) / max(len(test_set), 1)
    result = evaluate_detections(cfg.test, dets, test_set)
    result["s_per_img"] = sec
    result["train_minutes"] = train_time / 60
    write_result(result, out / "eval.json")
    log.write(
        json.dumps(
            {"iter": t.max_iter, "eval_mAP": result["mAP"], "eval_s_per_img": sec, "train_minutes": train_time / 60}
        )
        + "\n"
    )
    log.close()
    print(format_table(result))
    for metric, r in result.get("extra", {}).items():
        print(f"{metric}: mAP {r['mAP']:.4f}")
    print(f"torchvision: {train_time / 60:.1f} min training, {sec:.3f} s/img at test; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

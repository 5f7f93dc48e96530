"""detkit vs torchvision Faster R-CNN, side by side in one run (same weights, inputs, threads).

    python tools/benchmark.py [--cases r50_fpn bccd] [--threads 2] [--images 4] [--steps 4]
                              [--json OUT]

Cases:
    r50_fpn  torchvision's fasterrcnn_resnet50_fpn settings (800 px shorter side, frozen BN,
             3 trainable stages) vs detkit's converted twin (configs/faster_rcnn/
             r50_fpn_torchvision_coco.yaml), random weights copied from torchvision.
    bccd     the BCCD recipe (configs/faster_rcnn/bccd_r18_fpn.yaml): both models built from it.

Inputs are BCCD test images (640x480) with their boxes (synthetic images if ../shared is
absent). Each measurement alternates torchvision and detkit (A B A B ...) so that load from
elsewhere hits both alike; the report gives medians and the ratio detkit / torchvision
(< 1: detkit faster). Not a test: timings go to stdout and --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_images(n: int):
    """n (image uint8 RGB, boxes xyxy, labels) from BCCD test, or synthetic shapes."""
    import numpy as np

    from detkit.data.io import read_image_array

    bccd = Path(os.environ.get("DETKIT_SHARED", ROOT.parent / "shared")) / "data" / "BCCD"
    if bccd.is_dir():
        from detkit.data.voc import load_voc

        ds = load_voc(bccd, "test", classes=["Platelets", "RBC", "WBC"])
        recs = ds.records[:n]
        return [(read_image_array(r.file_name), r.boxes, r.labels) for r in recs], "BCCD test"
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
        boxes = np.array([[100, 100, 200, 220], [300, 50, 380, 120]], np.float32)
        out.append((img, boxes, np.array([1, 2])))
    return out, "synthetic 640x480"


def _case_config(name: str):
    from detkit.config import load_config
    from detkit.engine.convert import torchvision_r50_fpn_config
    from detkit.schema import Config

    if name == "r50_fpn":
        cfg = torchvision_r50_fpn_config()
        # Timing, not bit-for-bit parity: detkit's default (sparse) CPU RoIAlign.
        cfg.model.roi_head.cpu_sparse_roi_align = True
        cfg.model.channels_last_inference = True
        return cfg, 90
    if name == "bccd":
        cfg = load_config(ROOT / "configs/faster_rcnn/bccd_r18_fpn.yaml", Config)
        return cfg, 3
    raise SystemExit(f"unknown case {name}")


def _timeit(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_case(name: str, images, n_images: int, steps: int, warmup: int):
    import torch
    from torchvision_baseline import build_torchvision_model, set_torchvision_mode

    from detkit.data.build import dataset_transforms
    from detkit.engine.convert import map_torchvision_state
    from detkit.modeling.build import build_model
    from detkit.structures import ImageList, Target

    cfg, k = _case_config(name)
    torch.manual_seed(0)
    tv = build_torchvision_model(cfg, k)
    dk = build_model(cfg.model, k)
    dk.load_state_dict(map_torchvision_state(tv.state_dict()))
    test_tf = dataset_transforms(cfg.data.input, train=False)
    train_tf = dataset_transforms(cfg.data.input, train=True)
    # Fixed training input size (the first multi-scale entry) so both see the same pixels.
    train_tf.transforms = [t for t in train_tf.transforms if type(t).__name__ != "RandomHorizontalFlip"]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im, _, _ in images]

    def tv_infer(i):
        with torch.no_grad():
            tv([tensors[i]])

    def dk_infer(i):
        with torch.no_grad():
            empty = Target(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
            t, target = test_tf(tensors[i], empty)
            dk(ImageList.from_tensors([t], dk.size_divisibility, geometries=[target.geometry]))

    set_torchvision_mode(tv, False)
    dk.eval()
    tv_inf, dk_inf = [], []
    for i in range(warmup):
        tv_infer(i % len(images))
        dk_infer(i % len(images))
    for i in range(n_images):
        j = i % len(images)
        tv_inf.append(_timeit(lambda j=j: tv_infer(j)))
        dk_inf.append(_timeit(lambda j=j: dk_infer(j)))

    # Training steps: batch of 2 images, SGD step included.
    tv_opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    dk_opt = torch.optim.SGD([p for p in dk.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    set_torchvision_mode(tv, True)
    dk.train()
    batch = [0, 1]
    tv_targets = [{"boxes": torch.as_tensor(images[i][1]), "labels": torch.as_tensor(images[i][2])} for i in batch]

    def tv_step():
        losses = tv([tensors[i] for i in batch], tv_targets)
        tv_opt.zero_grad()
        sum(losses.values()).backward()
        tv_opt.step()

    def dk_step():
        pairs = [
            train_tf(
                tensors[i],
                Target(torch.as_tensor(images[i][1]), torch.as_tensor(images[i][2])),
            )
            for i in batch
        ]
        il = ImageList.from_tensors([p[0] for p in pairs], dk.size_divisibility)
        _, losses = dk(il, [p[1] for p in pairs])
        dk_opt.zero_grad()
        sum(losses.values()).backward()
        dk_opt.step()

    for _ in range(warmup):
        tv_step()
        dk_step()
    tv_tr, dk_tr = [], []
    for _ in range(steps):
        tv_tr.append(_timeit(tv_step))
        dk_tr.append(_timeit(dk_step))
    med = statistics.median
    res = {
        "case": name,
        "input": f"shorter side {cfg.data.input.min_size_test} (max {cfg.data.input.max_size})",
        "torchvision_infer_s_per_img": med(tv_inf),
        "detkit_infer_s_per_img": med(dk_inf),
        "infer_ratio": med(dk_inf) / med(tv_inf),
        "torchvision_train_s_per_step": med(tv_tr),
        "detkit_train_s_per_step": med(dk_tr),
        "train_ratio": med(dk_tr) / med(tv_tr),
        "images": n_images,
        "steps": steps,
        "batch": len(batch),
    }
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["bccd", "r50_fpn"], choices=["bccd", "r50_fpn"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=4, help="inference images per case")
    p.add_argument("--steps", type=int, default=4, help="training steps per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    images, source = _load_images(max(args.images, 2))
    results = []
    for case in args.cases:
        r = run_case(case, images, args.images, args.steps, args.warmup)
        results.append(r)
        print(
            f"{case:8s} {r['input']}: inference torchvision {r['torchvision_infer_s_per_img']:.3f} s/img, "
            f"detkit {r['detkit_infer_s_per_img']:.3f} s/img (ratio {r['infer_ratio']:.2f}); "
            f"training torchvision {r['torchvision_train_s_per_step']:.3f} s/step, "
            f"detkit {r['detkit_train_s_per_step']:.3f} s/step (ratio {r['train_ratio']:.2f})",
            flush=True,
        )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "images": source,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

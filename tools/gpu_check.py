"""The GPU check (run by tools/gpu_check.sh; a few minutes on one modern GPU): what this
machine's GPU does with detkit, in one JSON file.

    bash tools/gpu_check.sh [--out DIR] [--iters N] [--bench-images N] [--bench-steps N]

1. BCCD: ``configs/faster_rcnn/bccd_r18_fpn.yaml`` trained for a fixed number of iterations
   (the recipe's 450 by default) on the GPU with automatic mixed precision (bf16 where the
   GPU has it, else fp16 with a GradScaler), pinned-memory loaders with 4 workers and
   channels-last, then evaluated on BCCD test: s/iter (median of the logged periods after
   the first), training minutes, test mAP (VOC area and VOC07), test s/img.
2. R50-FPN at 800 px, detkit and torchvision side by side in one process on the same
   weights and images (tools/benchmark.py, case r50_fpn): inference s/img and training
   s/step, in float32 and under autocast.
3. With two or more GPUs: the BCCD recipe on 2 processes (torchrun, nccl) for 100
   iterations, global batch 2 x 2: that the distributed path runs, and its s/iter.

Everything goes to DIR/gpu_check.json (default work_dirs/gpu_check_<time>/), with the GPU's
name, memory, bf16 support and the torch / CUDA versions. Without a CUDA GPU it stops at
once with one line and exit status 1. BCCD must be where the config looks for it
(../shared/data/BCCD, or $DETKIT_DATA/BCCD).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BCCD_CONFIG = ROOT / "configs" / "faster_rcnn" / "bccd_r18_fpn.yaml"


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(1)


def environment(smoke: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        if not smoke:
            fail(
                f"needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU"
            )
        return {"device": "cpu (--smoke: a plumbing check, the figures mean nothing)", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


def check_bccd() -> None:
    from detkit.schema import load_run_config

    cfg = load_run_config(str(BCCD_CONFIG))
    for split in (cfg.data.train, cfg.data.test):
        if split is None or not split.root or not Path(split.root).is_dir():
            fail(f"BCCD not found at {split.root if split else '?'}: put it in ../shared/data/BCCD or set DETKIT_DATA")


def run(cmd, timeout: float, log: Path) -> float:
    """Run ``cmd`` (output to ``log``); -> seconds. A failure stops the check with the log's tail."""
    print("  $ " + " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            fail(f"{cmd[2] if len(cmd) > 2 else cmd[0]} took longer than {timeout:.0f} s (log: {log})")
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        fail(f"{' '.join(map(str, cmd[:4]))} failed (exit {proc.returncode}; log: {log}): " + " | ".join(tail))
    return time.perf_counter() - start


def train_overrides(iters: int, device: str) -> list:
    """The recipe's schedule scaled to ``iters`` (warmup 1/3, the x0.1 step at 80 %)."""
    return [
        f"train.max_iter={iters}",
        f"train.warmup_iters={min(200, max(iters // 3, 1))}",
        f"train.steps=[{max(int(iters * 0.8), 1)}]",
        f"train.device={device}",
        "train.amp=true",
        "train.num_threads=0",  # the data workers and torch share the CPU as they see fit
        "data.num_workers=4",
        f"train.log_period={max(min(20, iters // 10), 1)}",
    ]


def run_summary(out: Path) -> dict:
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    periods = [r["s_per_iter"] for r in records if "s_per_iter" in r]
    steady = periods[1:] or periods  # the first period holds start-up and cuDNN tuning
    ev = json.loads((out / "eval.json").read_text())
    minutes = [r["train_minutes"] for r in records if "train_minutes" in r]
    return {
        "s_per_iter": round(statistics.median(steady), 4),
        "s_per_iter_first_period": round(periods[0], 4) if periods else None,
        "train_minutes": round(minutes[-1], 3) if minutes else None,
        "mAP_voc": ev["mAP"],
        "mAP_voc07": ev.get("extra", {}).get("voc07", {}).get("mAP"),
        "per_class": ev.get("per_class"),
        "test_s_per_img": ev.get("s_per_img"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default work_dirs/gpu_check_<time>)")
    p.add_argument("--iters", type=int, default=450, help="BCCD training iterations (default: the recipe's 450)")
    p.add_argument("--bench-images", type=int, default=20, help="R50-FPN inference images per model")
    p.add_argument("--bench-steps", type=int, default=10, help="R50-FPN training steps per model")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # plumbing check on the CPU
    args = p.parse_args()
    start = time.perf_counter()
    env = environment(args.smoke)
    check_bccd()
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.out) if args.out else ROOT / "work_dirs" / f"gpu_check_{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "environment": env}
    print(f"gpu_check: {env['device']}; results in {out}", flush=True)

    print(f"1/3 BCCD, {args.iters} iterations with AMP", flush=True)
    bccd = out / "bccd"
    cmd = [sys.executable, "-m", "detkit", "train", BCCD_CONFIG, "--out", bccd, "--no-progress"]
    overrides = train_overrides(args.iters, device)
    if args.smoke:  # small images and 2 workers: the plumbing on a small CPU, in minutes
        overrides += ["data.input.min_size_train=[128]", "data.input.min_size_test=128", "data.input.max_size=192"]
        overrides += ["data.num_workers=2"]
    seconds = run(cmd + overrides, 1800 if args.smoke else 360, out / "bccd.log")
    report["bccd"] = {"config": str(BCCD_CONFIG.relative_to(ROOT)), "iterations": args.iters, "batch": 2}
    report["bccd"].update(run_summary(bccd), wall_s=round(seconds, 1))
    print(f"  {report['bccd']['s_per_iter']} s/iter, mAP {report['bccd']['mAP_voc']:.4f}", flush=True)

    print("2/3 R50-FPN 800 px, detkit vs torchvision (float32, then autocast)", flush=True)
    report["r50_fpn"] = {}
    for name, extra in (("fp32", []), ("amp", ["--amp"])):
        path = out / f"benchmark_{name}.json"
        bench = [sys.executable, ROOT / "tools" / "benchmark.py", "--cases", "r50_fpn", "--device", device]
        warmup = 0 if args.smoke else 3  # the first passes pick cuDNN kernels: not timed
        bench += ["--images", args.bench_images, "--steps", args.bench_steps, "--warmup", warmup, "--threads", 4]
        run(bench + extra + ["--json", path], 1800 if args.smoke else 180, out / f"benchmark_{name}.log")
        report["r50_fpn"][name] = json.loads(path.read_text())["results"][0]
        r = report["r50_fpn"][name]
        print(
            f"  {name}: inference detkit {r['detkit_infer_s_per_img']:.4f} / torchvision "
            f"{r['torchvision_infer_s_per_img']:.4f} s/img (ratio {r['infer_ratio']:.2f})",
            flush=True,
        )

    if env.get("gpus", 0) >= 2:
        print("3/3 BCCD on 2 processes (torchrun, nccl), 100 iterations", flush=True)
        dist_out = out / "bccd_2gpus"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m"]
        cmd = torchrun + ["detkit", "train", BCCD_CONFIG, "--out", dist_out, "--no-progress", "data.batch_size=2"]
        seconds = run(cmd + train_overrides(100, "cuda"), 180, out / "bccd_2gpus.log")
        summary = run_summary(dist_out)
        report["bccd_2gpus"] = {"iterations": 100, "global_batch": 4, **summary, "wall_s": round(seconds, 1)}
    else:
        print("3/3 skipped: one GPU (the 2-process check needs two)", flush=True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"gpu_check: done in {report['wall_s']:.0f} s: {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()

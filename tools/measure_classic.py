"""R-CNN vs SPP-net, measured with one command (issue 9, item 7): trains each config with
``detkit train`` (or finishes / reuses its run folder), then times test-time detection split
into proposals / features / classifier on the first images of the test split, and writes
one table.

    python tools/measure_classic.py                       # shapes: configs/{rcnn,spp}/shapes.yaml
    python tools/measure_classic.py --configs configs/rcnn/bccd_alexnet.yaml configs/spp/bccd_alexnet.yaml \\
        --out work_dirs/classic_bccd --images 20

Per config it reports: mAP (voc area and voc07 11-point, from the run's eval.json), the
minutes of every training stage (metrics.jsonl: the SGD stage's train_minutes, the offline
stages' stage_minutes), the feature-cache size (cache.json), and test seconds per image:

    proposals   Selective Search on the original image, as `detkit proposals` computes it
                (the config's mode and min_size; proposal files hide this cost at test time)
    features    the backbone on the image + pool5 / fc7 of every proposal (R-CNN: warp +
                the whole network per region; SPP-net: conv5 once + pyramid pooling + fc)
    classifier  SVM scores, box regression, per-class top-k and NMS

Results go to OUT/measure.json and OUT/measure.md; the machine's load average is recorded
with them (the test timings run on one thread each after the other, so a busy machine slows
them). Tool code, not library code: it reads detkit's run folders and calls the model's parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detkit.data.build import build_dataset, dataset_transforms  # noqa: E402
from detkit.data.io import read_image_array  # noqa: E402
from detkit.data.loader import build_test_loader  # noqa: E402
from detkit.engine.predictor import model_from_checkpoint  # noqa: E402
from detkit.modeling.proposals.selective_search import selective_search  # noqa: E402
from detkit.schema import load_run_config  # noqa: E402

DEFAULT_CONFIGS = ["configs/rcnn/shapes.yaml", "configs/spp/shapes.yaml"]


def train(config: str, out: Path, overrides) -> float:
    """detkit train (resumed when the folder already holds a run) -> wall minutes of this call."""
    cmd = [sys.executable, "-m", "detkit", "train", config, "--out", str(out), "--no-progress", *overrides]
    if (out / "run_state.json").is_file():
        cmd.insert(cmd.index("--out"), "--resume")
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return (time.perf_counter() - start) / 60


def stage_minutes(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_minutes" in record:
            out["finetune"] = out.get("finetune", 0.0) + record["train_minutes"]
        if "stage_minutes" in record:
            out[record["stage"]] = record["stage_minutes"]
    return out


@torch.no_grad()
def time_test(config: str, run: Path, overrides, num_images: int) -> dict:
    """Seconds per image of proposals / features / classifier on the first test images."""
    cfg = load_run_config(str(ROOT / config), overrides)
    model, cfg, classes = model_from_checkpoint(run / "model_final.pt", cfg, "cpu")
    head = model.roi_head
    dataset = build_dataset(cfg.data.test, classes, dataset_transforms(cfg.data.input, False), name="test")
    indices = list(range(min(num_images, len(dataset))))
    loader = build_test_loader(dataset, 1, 0, model.size_divisibility, indices=indices)
    ss = cfg.model.proposals.selective_search
    times = {"proposals": 0.0, "features": 0.0, "classifier": 0.0}
    regions = 0
    warm_up = next(iter(build_test_loader(dataset, 1, 0, model.size_divisibility, indices=indices[:1])))[0]
    model(warm_up)  # first-call costs (thread pool, allocator, numba's compilation) are not the method's
    selective_search(read_image_array(dataset.records[indices[0]].file_name), ss.mode, min_size=ss.min_size)
    for i, (images, _) in zip(indices, loader):
        rgb = read_image_array(dataset.records[i].file_name)
        t0 = time.perf_counter()
        selective_search(rgb, ss.mode, min_size=ss.min_size)
        t1 = time.perf_counter()
        x = images.tensor
        if model.channels_last_inference:
            x = x.contiguous(memory_format=torch.channels_last)
        features = model.backbone(x)
        proposals, _ = model.proposal_generator(images, features)  # the file's boxes (a lookup)
        boxes = [p.boxes for p in proposals]
        layers = sorted({"fc7", head.svm_features} | ({"pool5"} if bool(head.box_regressor.fitted) else set()))
        feats = head.region_features(images, features, boxes, layers)
        t2 = time.perf_counter()
        scores = head.svms(feats[head.svm_features]) if bool(head.svms.fitted) else None
        logits = head.predictor(feats["fc7"]).float()
        if scores is None:
            scores = torch.softmax(logits, -1)[:, 1:]
        deltas = head.box_regressor(feats["pool5"]) if bool(head.box_regressor.fitted) else None
        head.inference(torch.cat([logits, scores], 1), deltas, boxes, images.image_sizes)
        t3 = time.perf_counter()
        times["proposals"] += t1 - t0
        times["features"] += t2 - t1
        times["classifier"] += t3 - t2
        regions += sum(len(b) for b in boxes)
    n = max(len(indices), 1)
    out = {k: v / n for k, v in times.items()}
    out["total"] = sum(out.values())
    out["regions_per_image"] = regions / n
    out["images"] = len(indices)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--out", default="work_dirs/classic_shapes", help="one run folder per config inside")
    parser.add_argument("--images", type=int, default=50, help="test images timed (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the timing (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every detkit train")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": os.getloadavg(),
        "configs": {},
    }
    for config in args.configs:
        name = f"{Path(config).parent.name}_{Path(config).stem}"
        run = out / name
        wall = train(config, run, args.overrides)
        torch.set_num_threads(args.threads)
        evaluation = json.loads((run / "eval.json").read_text())
        cache = (
            json.loads((run / "feature_cache" / "cache.json").read_text()) if (run / "feature_cache").is_dir() else {}
        )
        maps = {m: r["mAP"] for m, r in evaluation.get("extra", {}).items()}
        maps[evaluation["metric"]] = evaluation["mAP"]
        results["configs"][config] = {
            "run": str(run),
            "mAP_voc": maps.get("voc"),
            "mAP_voc07": maps.get("voc07"),
            "train_minutes_per_stage": stage_minutes(run),
            "wall_minutes_of_this_call": wall,
            "feature_cache_bytes": cache.get("bytes"),
            "eval_s_per_img": evaluation.get("s_per_img"),
            "test_s_per_img": time_test(config, run, args.overrides, args.images),
        }
    results["load_average_end"] = os.getloadavg()
    (out / "measure.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"measured {results['date']} on {results['machine']}; load average {results['load_average_start'][0]:.1f} "
        f"at the start, {results['load_average_end'][0]:.1f} at the end",
        "",
        "| config | mAP voc | mAP voc07 | minutes per stage | cache | test s/img: proposals / features / classifier |",
        "|---|---|---|---|---|---|",
    ]
    for config, r in results["configs"].items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["train_minutes_per_stage"].items())
        t = r["test_s_per_img"]
        size = f"{r['feature_cache_bytes'] / 2**20:.0f} MB" if r["feature_cache_bytes"] else "-"
        lines.append(
            f"| {config} | {r['mAP_voc']:.3f} | {r['mAP_voc07']:.3f} | {stages} | {size} | "
            f"{t['proposals']:.3f} / {t['features']:.3f} / {t['classifier']:.4f} "
            f"({t['regions_per_image']:.0f} regions/img) |"
        )
    (out / "measure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

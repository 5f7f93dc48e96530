"""detkit vs torchvision Faster R-CNN, side by side in one run (same weights, inputs, threads).

    python tools/benchmark.py [--cases r50_fpn bccd denormal] [--threads 2] [--images 4] [--steps 4]
                              [--denormal-iters 40] [--device cpu|cuda] [--amp [--amp-dtype bf16]]
                              [--json OUT]
                              [--variant KEY=VALUE ...]

Cases:
    r50_fpn  torchvision's fasterrcnn_resnet50_fpn settings (800 px shorter side, frozen BN,
             3 trainable stages) vs detkit's converted twin (configs/faster_rcnn/
             r50_fpn_torchvision_coco.yaml), random weights copied from torchvision.
    bccd     the BCCD recipe (configs/faster_rcnn/bccd_r18_fpn.yaml): both models built from it.
    denormal detkit alone: the BCCD recipe trained on a one-class version of BCCD (WBC only;
             generated shapes when BCCD is absent) by two identical models side by side, one
             step each in turn, one with subnormal floats flushed to zero (train.flush_denormal,
             the default) and one without. Subnormals appear only after some training (a run
             slowed from 2.5 to 5.7 s/iter after ~20 iterations), so it runs --denormal-iters
             iterations and compares the step times past the first 20 (ratio off / on: > 1
             means flushing pays), next to the first 10; not part of the default cases.

``--variant KEY=VALUE ...`` adds a third model to the r50_fpn and bccd cases: detkit with
these config overrides (e.g. ``model.fold_batchnorm=false``: one speed lever switched off),
timed in the same rotation; its ratio to detkit says what the lever contributes.

detkit's inference is timed on what ``detkit eval`` / ``demo`` run: ``engine.inference.
inference_model`` (BatchNorm folded where the config asks for it).

Inputs are BCCD test images (640x480) with their boxes (synthetic images if ../shared is
absent). Each measurement alternates torchvision and detkit (A B A B ...) so that load from
elsewhere hits both alike; the report gives medians and the ratio detkit / torchvision
(< 1: detkit faster). Not a test: timings go to stdout and --json.

``--roofline`` adds what bounds the inference ratio on the CPU: the dense floating-point work
of one inference of each model (convolutions and matrix products, counted by torch's FLOP
formulas; RoIAlign, NMS and sparse products are not counted), the rate each model runs it at,
and the machine's compute roof with the same threads (the faster of a 4096^3 ``torch.mm`` and
a channels-last 3x3 convolution with 256 channels: the densest kernels these models run,
measured before and after the cases). The goal ratio of issue 11 (R18-FPN 0.70, R50-FPN 0.60)
then needs detkit at ``gflop / (goal * torchvision's s/img)`` GFLOP/s: lossless changes keep
the work, so a goal near or above the roof asks every operation to run as fast as the
machine's fastest kernel.

``--device cuda`` runs both models on the GPU (timings wait for the GPU to finish); ``--amp``
runs both under the same autocast (bfloat16 where the GPU has it, else float16), e.g. from
tools/gpu_check.sh; ``--amp --amp-dtype bf16`` on the CPU: both under CPU bfloat16 autocast
(``train.amp_dtype: bf16``, fast on CPUs with AVX512-BF16 or AMX).
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
from typing import Callable, Dict, List, Sequence

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
        cfg.model.fold_batchnorm = True
        return cfg, 90
    if name == "bccd":
        cfg = load_config(ROOT / "configs/faster_rcnn/bccd_r18_fpn.yaml", Config)
        return cfg, 3
    raise SystemExit(f"unknown case {name}")


# issue 11's inference goals (ratio detkit / torchvision), for --roofline
INFER_GOALS = {"bccd": 0.70, "r50_fpn": 0.60}


def dense_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of the dense convolutions and matrix products ``fn`` runs (one multiply-add = 2
    FLOP), by torch's FLOP formulas (``torch.utils.flop_counter``). Ops without a formula
    (RoIAlign, NMS) count 0, and so do products with a sparse operand: the formulas read
    shapes only and would count detkit's sparse RoIAlign as a dense product of its full size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    class DenseFlops(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            operands = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if formula is not None and all(t.layout == torch.strided for t in operands):
                self.flops += formula(*args, **kwargs, out_val=out)
            return out

    with DenseFlops() as counter:
        fn()
    return counter.flops / 1e9


def _rate(fn: Callable[[], object], flop: float, reps: int) -> float:
    fn()  # warm the kernel and the caches
    return flop / statistics.median(_timeit(fn) for _ in range(reps)) / 1e9


def roof_gflops(reps: int = 7) -> Dict[str, float]:
    """The machine's compute roof at the current thread count: the float32 rate (GFLOP/s,
    medians of ``reps``) of the two densest kernels these detectors run, a 4096^3 ``torch.mm``
    (MKL) and a channels-last 3x3 convolution, 256 -> 256 channels on 100x136 (oneDNN; an
    R50-FPN's P3 at 800 px), and their maximum, "roof". No model runs all its work faster."""
    import torch

    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"mm_4096": _rate(lambda: torch.mm(a, b), 2 * n**3, reps)}
    c, h, w = 256, 100, 136
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out["conv3x3_256_channels_last"] = _rate(lambda: conv(x), 2 * c * c * 9 * h * w, reps)
    out["roof"] = max(out.values())
    return out


def roofline(gflop: float, detkit_s: float, torchvision_s: float, roof_gflops: float, goal: float) -> Dict:
    """What an inference goal ratio asks of the CPU: detkit's rate now, the rate the goal
    needs (the same work in ``goal * torchvision_s``), and both as a share of the roof."""
    need = gflop / (goal * torchvision_s)
    return {
        "goal_ratio": goal,
        "detkit_gflops": gflop / detkit_s,
        "goal_gflops": need,
        "detkit_share_of_roof": gflop / detkit_s / roof_gflops,
        "goal_share_of_roof": need / roof_gflops,
    }


def _timeit(fn, device=None):
    import torch

    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()  # CUDA kernels run asynchronously: time until they are done
    return time.perf_counter() - t


def run_case(
    name: str,
    images,
    n_images: int,
    steps: int,
    warmup: int,
    device: str = "cpu",
    amp: bool = False,
    variant: Sequence[str] = (),
    roof_gflops: float = 0.0,
    amp_kind: str = "auto",
):
    """One case; ``roof_gflops`` > 0 (the machine's matrix-product rate) adds the roofline
    figures (see the module doc)."""
    import contextlib

    import torch
    from torchvision_baseline import build_torchvision_model, set_torchvision_mode

    from detkit.config import apply_overrides, from_dict, to_dict
    from detkit.data.build import dataset_transforms
    from detkit.engine.convert import map_torchvision_state
    from detkit.engine.inference import amp_dtype, autocast_context, inference_model
    from detkit.modeling.build import build_model
    from detkit.modeling.layout import to_channels_last
    from detkit.schema import Config
    from detkit.structures import ImageList, Target

    dev = torch.device(device)
    cfg, k = _case_config(name)
    torch.manual_seed(0)
    tv = build_torchvision_model(cfg, k)
    dk = build_model(cfg.model, k)
    dk.load_state_dict(map_torchvision_state(tv.state_dict()))
    tv.to(dev)
    dk.to(dev)
    # detkit with some levers switched off (--variant), the same weights
    dv, vcfg = None, cfg
    if variant:
        vcfg = from_dict(Config, apply_overrides(to_dict(cfg), list(variant)))
        dv = build_model(vcfg.model, k)
        dv.load_state_dict(map_torchvision_state(tv.state_dict()))
        dv.to(dev)
    dtype = amp_dtype(dev, amp, amp_kind)  # None: float32
    autocast = (lambda: autocast_context(dev, dtype)) if dtype is not None else contextlib.nullcontext
    test_tf = dataset_transforms(cfg.data.input, train=False)
    train_tf = dataset_transforms(cfg.data.input, train=True)
    # No random flips, so that both models see the same pixels.
    flips = ("RandomHorizontalFlip", "RandomVerticalFlip")
    train_tf.transforms = [t for t in train_tf.transforms if type(t).__name__ not in flips]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im, _, _ in images]
    # Both models get their input on the device; each resizes / normalises it there.
    tensors_dev = [t.to(dev) for t in tensors]

    def tv_infer(i):
        with torch.no_grad(), autocast():
            tv([tensors_dev[i]])

    def dk_infer(net, i):
        with torch.no_grad(), autocast():
            empty = Target(torch.zeros((0, 4), device=dev), torch.zeros(0, dtype=torch.long, device=dev))
            t, target = test_tf(tensors_dev[i], empty)
            net(ImageList.from_tensors([t], net.size_divisibility, geometries=[target.geometry]))

    set_torchvision_mode(tv, False)
    detkits = {"detkit": dk} if dv is None else {"detkit": dk, "variant": dv}
    nets = {}
    for key, model in detkits.items():
        model.eval()
        nets[key] = inference_model(model)  # what detkit eval / demo run
    tv_inf: List[float] = []
    inf: Dict[str, List[float]] = {key: [] for key in nets}
    for i in range(warmup):
        tv_infer(i % len(images))
        for net in nets.values():
            dk_infer(net, i % len(images))
    for i in range(n_images):
        j = i % len(images)
        tv_inf.append(_timeit(lambda j=j: tv_infer(j), dev))
        for key, net in nets.items():
            inf[key].append(_timeit(lambda net=net, j=j: dk_infer(net, j), dev))
    # the dense work per image, averaged over the timed images (it varies with the detections)
    gflop = {}
    if roof_gflops > 0:
        shown = range(min(n_images, len(images)))
        net = nets["detkit"]
        gflop["torchvision"] = statistics.mean(dense_gflop(lambda j=j: tv_infer(j)) for j in shown)
        gflop["detkit"] = statistics.mean(dense_gflop(lambda j=j, net=net: dk_infer(net, j)) for j in shown)
        del net
    del nets

    # Training steps: batch of 2 images, SGD step included.
    set_torchvision_mode(tv, True)
    batch = [0, 1]
    tv_targets = [
        {"boxes": torch.as_tensor(images[i][1]).to(dev), "labels": torch.as_tensor(images[i][2]).to(dev)} for i in batch
    ]
    # float16 gradients need loss scaling (bfloat16 and float32 do not): the same for all
    tv_opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    tv_scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    opts = {
        key: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        for key, m in detkits.items()
    }
    scalers = {key: torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16) for key in detkits}

    def tv_step():
        with autocast():
            losses = tv([tensors_dev[i] for i in batch], tv_targets)
        tv_opt.zero_grad()
        tv_scaler.scale(sum(losses.values())).backward()
        tv_scaler.step(tv_opt)
        tv_scaler.update()

    def dk_step(key):
        model, opt, scaler = detkits[key], opts[key], scalers[key]
        with autocast():
            pairs = [
                train_tf(
                    tensors_dev[i],
                    Target(torch.as_tensor(images[i][1]).to(dev), torch.as_tensor(images[i][2]).to(dev)),
                )
                for i in batch
            ]
            il = ImageList.from_tensors([p[0] for p in pairs], model.size_divisibility)
            if layouts[key]:
                il = ImageList(il.tensor.contiguous(memory_format=torch.channels_last), il.image_sizes)
            _, losses = model(il, [p[1] for p in pairs])
        opt.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()

    # the trainer's layout (train.channels_last: modeling.layout)
    layouts = {"detkit": cfg.train.channels_last, "variant": vcfg.train.channels_last if dv is not None else False}
    for key, model in detkits.items():
        if layouts[key]:
            to_channels_last(model, dev)
        model.train()
    for _ in range(warmup):
        tv_step()
        for key in detkits:
            dk_step(key)
    tv_tr: List[float] = []
    tr: Dict[str, List[float]] = {key: [] for key in detkits}
    for _ in range(steps):
        tv_tr.append(_timeit(tv_step, dev))
        for key in detkits:
            tr[key].append(_timeit(lambda key=key: dk_step(key), dev))
    dk_inf, dk_tr = inf["detkit"], tr["detkit"]
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
        "device": str(dev),
        "amp": str(dtype).replace("torch.", "") if dtype is not None else None,
    }
    if gflop:
        res["torchvision_infer_gflop"] = gflop["torchvision"]
        res["detkit_infer_gflop"] = gflop["detkit"]
        res["torchvision_infer_gflops"] = gflop["torchvision"] / med(tv_inf)
        res["roof_gflops"] = roof_gflops
        res["roofline"] = roofline(gflop["detkit"], med(dk_inf), med(tv_inf), roof_gflops, INFER_GOALS[name])
    if dv is not None:
        res["variant"] = list(variant)
        res["variant_infer_s_per_img"] = med(inf["variant"])
        res["variant_train_s_per_step"] = med(tr["variant"])
        # > 1: the levers the variant switches off save time
        res["variant_over_detkit_infer"] = med(inf["variant"]) / med(dk_inf)
        res["variant_over_detkit_train"] = med(tr["variant"]) / med(dk_tr)
    return res


def _subnormal_count(model, optimizer) -> int:
    """Subnormal float32 values (0 < |x| < 2^-126) in the weights, gradients and momentum."""
    import torch

    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [s["momentum_buffer"] for s in optimizer.state.values() if s.get("momentum_buffer") is not None]
    tiny = torch.finfo(torch.float32).tiny
    return int(sum(((t.detach().abs() < tiny) & (t.detach() != 0)).sum() for t in tensors))


def _denormal_setup():
    """The BCCD recipe on one-class BCCD (or generated shapes) -> (cfg, train set, classes, source)."""
    from detkit.config import load_config
    from detkit.data.build import build_datasets
    from detkit.schema import Config, DatasetConfig, ShapesConfig

    cfg = load_config(ROOT / "configs/faster_rcnn/bccd_r18_fpn.yaml", Config)
    bccd = Path(os.environ.get("DETKIT_SHARED", ROOT.parent / "shared")) / "data" / "BCCD"
    if bccd.is_dir():
        # One class, as in the run where the slowdown was seen (a one-class VOC folder).
        cfg.data.train = DatasetConfig(format="voc", root=str(bccd), split="trainval")
        cfg.data.classes = ["WBC"]
        source = "BCCD trainval, class WBC only"
    else:
        import tempfile

        root = Path(tempfile.mkdtemp()) / "shapes"
        cfg.data.train = DatasetConfig(
            format="shapes", root=str(root), split="train", shapes=ShapesConfig(num_train=40)
        )
        cfg.data.classes = None
        source = "generated shapes"
    cfg.data.test = None
    train_set, _, classes = build_datasets(cfg, need_train=True, need_test=False)
    return cfg, train_set, classes, source


def _denormal_worker(conn, flush: bool, threads: int) -> None:
    """One side of the denormal case, in a fresh process: the flush mode is a per-thread CPU
    flag that torch's pool threads inherit when they start, so it is set before any tensor
    work. Trains one step per "step" message and answers (seconds, subnormal count or None)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)
    from detkit.data.loader import build_train_loader
    from detkit.engine.trainer import LRSchedule, build_optimizer
    from detkit.modeling.build import build_model

    cfg, train_set, classes, source = _denormal_setup()
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, len(classes), cfg.data.input).train()
    optimizer = build_optimizer(model, t)
    schedule = LRSchedule(t.max_iter, t.warmup_iters, t.warmup_factor, t.lr_schedule, t.steps, t.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = iter(build_train_loader(train_set, cfg.data.batch_size, t.seed, size_divisibility=model.size_divisibility))
    conn.send(f"{source}; shorter side {cfg.data.input.min_size_train}, batch {cfg.data.batch_size}")
    while True:
        message = conn.recv()
        if message == "stop":
            return
        images, targets = next(data)
        start = time.perf_counter()
        _, losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - start
        conn.send((seconds, _subnormal_count(model, optimizer) if message == "step+count" else None))


def run_denormal_case(iters: int, threads: int, skip: int = 20):
    """Two identical detkit models trained side by side in two processes, one step each in
    turn (load from elsewhere on the machine hits both alike), flush on / off."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    sides = []
    for flush in (True, False):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_denormal_worker, args=(child, flush, threads), daemon=True)
        proc.start()
        sides.append({"flush": flush, "conn": parent, "proc": proc, "s": [], "subnormals": []})
    try:
        inputs = [side["conn"].recv() for side in sides]
        for it in range(iters):
            count = (it + 1) % 10 == 0 or it + 1 == iters
            for side in sides:
                side["conn"].send("step+count" if count else "step")
                seconds, subnormals = side["conn"].recv()
                side["s"].append(seconds)
                if subnormals is not None:
                    side["subnormals"].append((it + 1, subnormals))
            if count:
                print(
                    f"  denormal: iteration {it + 1}/{iters}: "
                    + ", ".join(
                        f"flush {'on' if side['flush'] else 'off'} {statistics.median(side['s'][-10:]):.2f} s/iter, "
                        f"{side['subnormals'][-1][1]} subnormal values"
                        for side in sides
                    ),
                    flush=True,
                )
    finally:
        for side in sides:
            try:
                side["conn"].send("stop")
            except OSError:
                pass
            side["proc"].join(timeout=30)
    on, off = sides
    med = statistics.median
    late = slice(skip, None) if iters > skip else slice(None)
    return {
        "case": "denormal",
        "input": inputs[0],
        "threads": threads,
        "iterations": iters,
        "flush_on_s_per_iter_first10": med(on["s"][:10]),
        "flush_off_s_per_iter_first10": med(off["s"][:10]),
        f"flush_on_s_per_iter_after{skip}": med(on["s"][late]),
        f"flush_off_s_per_iter_after{skip}": med(off["s"][late]),
        "ratio_off_on_first10": med(off["s"][:10]) / med(on["s"][:10]),
        f"ratio_off_on_after{skip}": med(off["s"][late]) / med(on["s"][late]),
        "subnormals_flush_off": off["subnormals"],
        "subnormals_flush_on": on["subnormals"],
        "s_per_iter_flush_on": on["s"],
        "s_per_iter_flush_off": off["s"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["bccd", "r50_fpn"], choices=["bccd", "r50_fpn", "denormal"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=4, help="inference images per case")
    p.add_argument("--steps", type=int, default=4, help="training steps per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--denormal-iters", type=int, default=40, help="training iterations of the denormal case")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run (default cpu)")
    p.add_argument("--amp", action="store_true", help="both under autocast (bf16 where the GPU has it, else fp16)")
    p.add_argument(
        "--amp-dtype", default="auto", choices=["auto", "bf16", "fp16"], help="with --amp: as train.amp_dtype"
    )
    p.add_argument("--roofline", action="store_true", help="also the dense FLOPs and the CPU's matmul roof")
    p.add_argument(
        "--variant", nargs="+", default=[], metavar="KEY=VALUE", help="also time detkit with these config overrides"
    )
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark.py: --device cuda but torch.cuda.is_available() is False")

    torch.set_num_threads(args.threads)
    images, source = _load_images(max(args.images, 2))
    results = []
    roof = 0.0
    if args.roofline:
        if args.device != "cpu":
            raise SystemExit("benchmark.py: --roofline is a CPU measure (use --device cpu)")
        roofs = [roof_gflops()]
        roof = roofs[0]["roof"]
        print(
            f"roof at {args.threads} threads: {roof:.1f} GFLOP/s (4096^3 mm {roofs[0]['mm_4096']:.1f}, channels-last "
            f"3x3 conv {roofs[0]['conv3x3_256_channels_last']:.1f})",
            flush=True,
        )
    for case in args.cases:
        if case == "denormal":
            r = run_denormal_case(args.denormal_iters, args.threads)
            results.append(r)
            print(
                f"denormal {r['input']}: flush on / off {r['flush_on_s_per_iter_first10']:.2f} / "
                f"{r['flush_off_s_per_iter_first10']:.2f} s/iter in the first 10 iterations "
                f"(ratio {r['ratio_off_on_first10']:.2f}), {r['flush_on_s_per_iter_after20']:.2f} / "
                f"{r['flush_off_s_per_iter_after20']:.2f} s/iter after 20 (ratio {r['ratio_off_on_after20']:.2f}); "
                f"subnormal weights/gradients/momentum at the end: {r['subnormals_flush_off'][-1][1]} without "
                f"flushing, {r['subnormals_flush_on'][-1][1]} with",
                flush=True,
            )
            continue
        r = run_case(
            case,
            images,
            args.images,
            args.steps,
            args.warmup,
            args.device,
            args.amp,
            args.variant,
            roof,
            amp_kind=args.amp_dtype,
        )
        results.append(r)
        print(
            f"{case:8s} {r['input']}: inference torchvision {r['torchvision_infer_s_per_img']:.3f} s/img, "
            f"detkit {r['detkit_infer_s_per_img']:.3f} s/img (ratio {r['infer_ratio']:.2f}); "
            f"training torchvision {r['torchvision_train_s_per_step']:.3f} s/step, "
            f"detkit {r['detkit_train_s_per_step']:.3f} s/step (ratio {r['train_ratio']:.2f})",
            flush=True,
        )
        if roof:
            rl = r["roofline"]
            print(
                f"{case:8s} dense work per image: torchvision {r['torchvision_infer_gflop']:.1f} GFLOP at "
                f"{r['torchvision_infer_gflops']:.1f} GFLOP/s, detkit {r['detkit_infer_gflop']:.1f} GFLOP at "
                f"{rl['detkit_gflops']:.1f} GFLOP/s ({rl['detkit_share_of_roof']:.0%} of the roof); the goal "
                f"ratio {rl['goal_ratio']:.2f} needs {rl['goal_gflops']:.1f} GFLOP/s "
                f"({rl['goal_share_of_roof']:.0%} of the roof)",
                flush=True,
            )
        if args.variant:
            print(
                f"{case:8s} detkit with {' '.join(args.variant)}: inference {r['variant_infer_s_per_img']:.3f} s/img "
                f"(x{r['variant_over_detkit_infer']:.2f} of detkit's), training {r['variant_train_s_per_step']:.3f} "
                f"s/step (x{r['variant_over_detkit_train']:.2f})",
                flush=True,
            )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "threads": args.threads,
        "images": source,
        **({"roof_start": roofs[0], "roof_end": roof_gflops()} if roof else {}),
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

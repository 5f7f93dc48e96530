"""What the sparse RoIAlign's backward pass costs a BCCD training step, before and after
(issue 11, items 5 and 7): one model, one batch stream, steps alternating between

    coalesce  W^T as the COO transpose of W coalesced into CSR (detkit until 2026-12-01:
              a sort of 64-bit (row, column) keys and a merge of repeated pairs)
    sorted    W^T from one stable sort of W's column indices (``poolers._transposed_csr``)

so that load from elsewhere hits both alike. Both give the same gradient up to the order of
float sums (tests/modeling/test_poolers.py compares the backward with torchvision's). Prints
the median step of each and their ratio (sorted / coalesce < 1: the new build pays); the
step is the recipe's (configs/faster_rcnn/bccd_r18_fpn.yaml, or --bf16: its bf16 twin), two
BCCD test images, forward + backward + SGD, channels-last as the trainer runs it.

    python tools/probe_sparse_backward.py [--bf16] [--rounds 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def coalesced_transpose(cols, weights, per_row, shape):
    """The former build of W^T: COO (row, column) entries, transposed, coalesced into CSR."""
    rows = torch.arange(shape[0], device=cols.device).repeat_interleave(per_row)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), weights, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.t().to_sparse_csr()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bf16", action="store_true", help="CPU bfloat16 autocast (configs/faster_rcnn/bccd_r18_fpn_bf16)")
    p.add_argument("--rounds", type=int, default=12, help="timed steps of each build")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from benchmark import _load_images

    from detkit.config import load_config
    from detkit.data.build import dataset_transforms
    from detkit.engine.inference import autocast_context, denormals_flushed
    from detkit.modeling import poolers
    from detkit.modeling.build import build_model
    from detkit.modeling.layout import to_channels_last
    from detkit.schema import Config
    from detkit.structures import ImageList, Target

    name = "bccd_r18_fpn_bf16.yaml" if args.bf16 else "bccd_r18_fpn.yaml"
    cfg = load_config(ROOT / "configs/faster_rcnn" / name, Config)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    to_channels_last(model, cpu)
    model.train()
    images, source = _load_images(4)
    transform = dataset_transforms(cfg.data.input, train=True)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im, _, _ in images]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(k: int) -> None:
        pairs = [
            transform(tensors[i], Target(torch.as_tensor(images[i][1]), torch.as_tensor(images[i][2])))
            for i in ((2 * k) % 4, (2 * k + 1) % 4)
        ]
        batch = ImageList.from_tensors([t for t, _ in pairs], model.size_divisibility)
        batch = ImageList(batch.tensor.contiguous(memory_format=torch.channels_last), batch.image_sizes)
        autocast = autocast_context(cpu, torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with autocast:
            _, losses = model(batch, [t for _, t in pairs])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    builds = {"coalesce": coalesced_transpose, "sorted": poolers._transposed_csr}
    times: dict = {key: [] for key in builds}
    with denormals_flushed(True):
        for k in range(2):
            step(k)
        for k in range(args.rounds):
            for key, build in builds.items():
                poolers._transposed_csr = build  # type: ignore[assignment]
                start = time.perf_counter()
                step(k)
                times[key].append(time.perf_counter() - start)
    poolers._transposed_csr = builds["sorted"]  # type: ignore[assignment]
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"{name}, {source}, {args.threads} threads, {args.rounds} steps each, alternating")
    for key, value in med.items():
        print(f"  {key:9s} {value:.3f} s/step")
    print(f"  sorted / coalesce: {med['sorted'] / med['coalesce']:.3f}")


if __name__ == "__main__":
    main()

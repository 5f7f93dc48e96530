"""The worker of test_distributed.py's collective-helper test: run in 2 processes
(torch.multiprocessing, gloo) it exercises ``detkit.engine.distributed``'s helpers and the
CPU SyncBatchNorm and saves what each rank saw; the test compares. A module of its own so
that the spawned processes import little (torch and the helpers)."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from detkit.engine import distributed
from detkit.errors import DetkitError, UsageError


def helpers_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = {"shard": distributed.shard(list(range(7)))}
        r["broadcast"] = distributed.broadcast_from_main({"from": rank})
        r["gather"] = distributed.gather_to_main(rank * 10)
        r["all_gather"] = distributed.all_gather(rank * 10)
        r["sum"] = distributed.all_reduce_sum([rank, 1.5])
        r["any"] = (distributed.any_rank(rank == 1), distributed.any_rank(False))
        r["failure"] = distributed.first_failure("loss is nan here" if rank == 1 else None)
        r["no_failure"] = distributed.first_failure(None)

        def bad_folder():
            raise UsageError("output folder is in the way")

        try:
            distributed.on_main(bad_folder)
        except DetkitError as exc:
            r["on_main"] = (type(exc).__name__, str(exc), getattr(exc, "consequence", False))
        written = []
        with distributed.RoundGatherer(5, 2, written.append) as gather:  # shares of 3 and 2 items
            for item in distributed.shard(list(range(5))):
                gather.add(item)
        r["rounds"] = written
        bn = nn.BatchNorm2d(3)
        bn.running_mean.fill_(float(rank))
        distributed.sync_buffers(bn)
        r["synced"] = bn.running_mean.tolist()

        # SyncBatchNorm on uneven shares (rank 0: 3 images, rank 1: 1) against BatchNorm on all 4.
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 6) * 3 + 2
        w = torch.randn(4, 3, 5, 6)
        ref = nn.BatchNorm2d(3)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        sync = distributed.CPUSyncBatchNorm(3)
        sync.load_state_dict(ref.state_dict())
        xa = x.clone().requires_grad_()
        ya = ref(xa)
        (ya * w).sum().backward()
        part = slice(0, 3) if rank == 0 else slice(3, 4)
        xb = x[part].clone().requires_grad_()
        yb = sync(xb)
        (yb * w[part]).sum().backward()
        weight_grad = sync.weight.grad.clone()
        dist.all_reduce(weight_grad)
        r["syncbn"] = {
            "out": float((ya[part] - yb).abs().max()),
            "input_grad": float((xa.grad[part] - xb.grad).abs().max()),
            "weight_grad": float((weight_grad - ref.weight.grad).abs().max()),
            "running_mean": float((ref.running_mean - sync.running_mean).abs().max()),
            "running_var": float((ref.running_var - sync.running_var).abs().max()),
            "grad_scale": float(xa.grad.abs().max()),
        }
        sync.eval()
        r["syncbn"]["eval"] = float((ref.eval()(x) - sync(x)).abs().max())
        torch.save(r, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()

"""Distributed runs on ``torch.distributed``, started by torchrun (detkit has no launcher of
its own):

    torchrun --nproc_per_node=4 -m detkit train CONFIG [--out DIR] [key=value ...]   # 4 processes
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
             --rdzv-id=JOB -m detkit train CONFIG ...                               # on each machine

torchrun starts the processes and gives each RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
(MASTER_ADDR / MASTER_PORT) in its environment; ``init_distributed`` joins the process group
from them (backend nccl on CUDA, gloo on the CPU, ``train.dist_backend`` overrides) and
returns the rank's device (``cuda:LOCAL_RANK`` on GPUs). Without WORLD_SIZE, or with one
process, nothing here does anything and every helper is the single-process identity.

Terms: W processes (ranks 0..W-1), rank 0 the *main* process; B = ``data.batch_size``
images per rank and iteration, so the global batch is B x W and ``train.base_lr`` is the
learning rate of that global batch (it is not rescaled when W changes).

The contract every stage follows (training, evaluation, proposal dumps; R-CNN's feature
cache joins it the same way):

- Only rank 0 writes into the run folder (config, metrics.jsonl, checkpoints, run_state,
  eval files, partial chunks) and prints results; other ranks log warnings and errors only,
  prefixed with their rank. So the run folder need only exist on rank 0's machine.
- A decision that depends on files (the folder to use, the checkpoint to resume from, the
  stages already done, the images a partial dump still lacks) is made on rank 0 and handed
  to every rank: ``on_main(fn)``; its result, or its one-line error, reaches all ranks.
- Per-image work is sharded: ``shard(items)`` is this rank's slice (every W-th item, from
  its rank on). Results travel to rank 0 with ``gather_to_main`` (once, e.g. evaluation's
  detections) or, for long resumable jobs, with ``RoundGatherer``: every rank hands its
  results over in rounds and rank 0 writes each round as one chunk, so a restarted job
  computes only what no chunk holds. A stage does::

      todo = on_main(lambda: [i for i in items if i not in done_on_disk])
      with RoundGatherer(len(todo), round_size, write_chunk) as gather:   # write_chunk: rank 0 only
          for item in shard(todo):
              gather.add(compute(item))

- A rank that fails stops the job with its own one-line message: the command line prints it
  prefixed with the rank (``failures_reported``) and writes it to torchrun's error file, so
  torchrun's summary names the rank and the message as the root cause; torchrun then stops
  the other ranks of the machine. Ranks elsewhere notice at their next collective (the
  connection to the failed rank closes), or after ``train.dist_timeout_min`` at the latest,
  and stop with "another rank failed". Failures every rank sees at once (a non-finite loss
  on one rank, rank 0's bad output folder) are agreed on first (``first_failure``,
  ``on_main``), so every rank stops with the same message.

Also here: a SyncBatchNorm for the CPU (torch's needs CUDA), the conversion of
``norm: syncbn`` layers, DDP wrapping, buffer synchronisation and per-rank seeds.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from detkit.errors import DetkitError, DistributedError, TrainingError

logger = logging.getLogger("detkit")

T = TypeVar("T")

# What torchrun sets in every process it starts (torch.distributed's env:// initialisation).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# -- launch --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in the job, from torchrun's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_from_env() -> Launch:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; a plain process is rank 0 of 1.
    A partial set (WORLD_SIZE without RANK, ...) is a DistributedError naming what is missing."""
    if "WORLD_SIZE" not in os.environ:
        return Launch()
    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    try:
        world = int(os.environ["WORLD_SIZE"])
        if world > 1 and missing:
            raise DistributedError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} not: start detkit with torchrun "
                "(torchrun --nproc_per_node=N -m detkit ...), which sets them all"
            )
        launch = Launch(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        values = ", ".join(f"{v}={os.environ.get(v)!r}" for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        raise DistributedError(f"torchrun's launch variables are not integers: {values}") from None
    if not (launch.world_size >= 1 and 0 <= launch.rank < launch.world_size and launch.local_rank >= 0):
        raise DistributedError(f"inconsistent launch variables: {launch}")
    return launch


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """True in a process group of more than one process."""
    return world_size() > 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> nccl on CUDA, gloo on the CPU; nccl without CUDA is refused."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("train.dist_backend: nccl needs CUDA devices; use gloo (or auto) on the CPU")
    if backend not in ("nccl", "gloo"):
        raise DistributedError(f"train.dist_backend: unknown backend {backend!r} (use auto, nccl or gloo)")
    return backend


def init_distributed(backend: str = "auto", device: Optional[torch.device] = None, timeout_min: float = 30.0):
    """Join the process group torchrun prepared (a no-op for a single process, and when the
    group exists already, e.g. a second command in the same process). -> the device this
    rank computes on: ``cuda:LOCAL_RANK`` for CUDA, else ``device`` unchanged.

    Ranks other than 0 then log warnings and errors only, prefixed with their rank."""
    device = torch.device("cpu") if device is None else torch.device(device)
    launch = launch_from_env()
    if launch.world_size <= 1:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise DistributedError(
                f"LOCAL_RANK {launch.local_rank} but this machine shows {count} CUDA device(s): "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    _quiet_other_ranks(launch.rank)
    if is_initialized():
        return device
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: run detkit without torchrun")
    name = resolve_backend(backend, device)
    dist.init_process_group(name, timeout=timedelta(minutes=timeout_min))
    atexit.register(_destroy)
    if launch.rank == 0:
        logger.info("distributed: %d processes, backend %s", launch.world_size, name)
    return device


def _destroy() -> None:
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the job is ending anyway (another rank may be gone)
            pass


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record):
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _quiet_other_ranks(rank_: int) -> None:
    if rank_ == 0:
        return
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _RankPrefix) for f in logger.filters):
        logger.addFilter(_RankPrefix(rank_))


@contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Warnings of the block only on rank 0, e.g. while every rank loads the same dataset
    (its one summary line per problem would otherwise appear W times)."""
    if is_main():
        yield
        return
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- failures ------------------------------------------------------------------------------------
# Text of the errors torch raises when a collective loses another rank (gloo: "Connection
# closed by peer", "Timed out waiting ..."; nccl: "NCCL ..."), or from its own error types.
_COMM_ERROR_TEXT = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, DetkitError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _COMM_ERROR_TEXT)


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Inside a distributed run, an error of a collective (the other end is gone or timed
    out) becomes a one-line DistributedError; the rank that failed tells why in its own line."""
    try:
        yield
    except Exception as exc:
        if not is_distributed() or not _is_comm_error(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # gloo's "[/path/pair.cc:561] " prefix off, and its advice after the first sentence
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]
        message = f"stopped during {what}: another rank failed or was lost (its own message says why; {first})"
        raise _consequence(message) from None


def _consequence(message: str) -> DistributedError:
    """A DistributedError of a rank that stops because another rank failed: torchrun is told
    it happened later than that failure (``failures_reported``)."""
    error = DistributedError(message)
    error.consequence = True  # type: ignore[attr-defined]
    return error


def failure_prefix() -> str:
    """'[rank R of W] ' in a distributed job (also before the process group exists), else ''."""
    if is_distributed():
        return f"[rank {rank()} of {world_size()}] "
    try:
        launch = launch_from_env()
    except DistributedError:  # a broken launch environment: its own error says so
        return ""
    return f"[rank {launch.rank} of {launch.world_size}] " if launch.world_size > 1 else ""


def write_error_file(message: str, consequence: bool = False) -> None:
    """Hand ``message`` to torchrun as this worker's error (the file it names in
    TORCHELASTIC_ERROR_FILE, in its documented JSON layout): torchrun's failure summary shows
    the earliest one as the root cause, with its rank. Its clock counts whole seconds and
    breaks ties by rank, so a rank that only stops because another failed (``consequence``)
    dates its error a second later: the failing rank stays the root cause. Nothing happens
    outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + (1 if consequence else 0))
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": stamp}}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass


@contextmanager
def failures_reported() -> Iterator[None]:
    """Around a command in a torchrun job: a DetkitError leaves with the rank in front of
    its one-line message and is written to torchrun's error file; any other exception (a
    bug) is written there too and keeps its traceback. A single process: no change."""
    try:
        yield
    except DetkitError as exc:
        prefix = failure_prefix()
        if not prefix:
            raise
        message = str(exc) if str(exc).startswith(prefix) else prefix + str(exc)
        write_error_file(message, consequence=getattr(exc, "consequence", False))
        raise DistributedError(message) from None
    except Exception as exc:
        prefix = failure_prefix()
        if prefix:
            write_error_file(f"{prefix}{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        raise


# -- collectives -------------------------------------------------------------------------------
def _tensor_device() -> torch.device:
    """Where tensors of a collective must live: the current GPU for nccl, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(what: str = "a barrier") -> None:
    if is_distributed():
        with collective(what):
            dist.barrier()


def broadcast_from_main(obj: T, what: str = "a broadcast") -> T:
    """Rank 0's ``obj`` on every rank (picklable; other ranks' ``obj`` is ignored)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    with collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def gather_to_main(obj: T, what: str = "gathering results") -> Optional[List[T]]:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out: Optional[List[Any]] = [None] * world_size() if is_main() else None
    with collective(what):
        dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: T, what: str = "gathering results") -> List[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float], what: str = "summing across ranks") -> List[float]:
    """Elementwise sums of ``values`` over the ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_tensor_device())
    with collective(what):
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool, what: str = "agreeing across ranks") -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    return all_reduce_sum([1.0 if flag else 0.0], what)[0] > 0


def first_failure(message: Optional[str], what: str = "agreeing across ranks") -> Optional[Tuple[int, str]]:
    """Every rank passes its failure (None when all is well) -> (rank, message) of the
    lowest failing rank, the same on every rank, or None. One small all-reduce when all is
    well, so a loop can check every iteration."""
    if not is_distributed():
        return (0, message) if message is not None else None
    flags = [0.0] * world_size()
    flags[rank()] = 1.0 if message is not None else 0.0
    failed = [r for r, f in enumerate(all_reduce_sum(flags, what)) if f > 0]
    if not failed:
        return None
    box = [message if rank() == failed[0] else None]
    with collective(what):
        dist.broadcast_object_list(box, src=failed[0])
    return failed[0], str(box[0])


def _main_decides(fn: Callable[[], T], what: str, hand_on: bool) -> Tuple[bool, Any]:
    """Run ``fn`` on rank 0 and broadcast ("ok", its result if ``hand_on``) or its
    DetkitError's message -> (ran here, value)."""
    if is_main():
        try:
            result = fn()
        except DetkitError as exc:
            broadcast_from_main(("error", str(exc)), what)
            raise
        broadcast_from_main(("ok", result if hand_on else None), what)
        return True, result
    kind, value = broadcast_from_main(("ok", None), what)
    if kind == "error":
        raise _consequence(f"stopped: rank 0 failed: {value}")
    return False, value


def on_main(fn: Callable[[], T], what: str = "a decision on rank 0") -> T:
    """``fn()`` on rank 0 only, its result on every rank. A DetkitError of ``fn`` stops
    every rank: rank 0 raises it, the others a DistributedError quoting it."""
    if not is_distributed():
        return fn()
    return _main_decides(fn, what, hand_on=True)[1]


def main_first(fn: Callable[[], T], what: str = "preparing on rank 0") -> T:
    """``fn()`` on rank 0, then on the other ranks, each keeping its own result: for work
    that may create shared files the first time (a generated dataset), so that the others
    find them made. A DetkitError on rank 0 stops every rank, as in ``on_main``."""
    if not is_distributed():
        return fn()
    ran, value = _main_decides(fn, what, hand_on=False)
    return value if ran else fn()


# -- sharding ------------------------------------------------------------------------------------
def shard(items: Sequence[T], rank_: Optional[int] = None, world: Optional[int] = None) -> List[T]:
    """This rank's share of ``items``: every W-th item from its rank on (round robin keeps the
    shares within one item of each other, also for sorted inputs)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


class RoundGatherer:
    """Results of a sharded loop, handed to rank 0 in rounds.

    ``total``: how many items all ranks together process (every rank derives the same
    number of rounds from it, so the collectives match even when the shares differ by one);
    ``round_size``: results per rank and round; ``write(results)`` runs on rank 0 after each
    round with the results of that round from every rank (rank order). Use it as a context
    manager: leaving the block normally finishes the remaining rounds; leaving it with an
    exception hands rank 0's own pending results to ``write`` (no collective: the other ranks
    may be gone) and drops the other ranks'. With one process ``write`` simply runs every
    ``round_size`` results."""

    def __init__(self, total: int, round_size: int, write: Callable[[List[Any]], None], what: str = "results"):
        if round_size < 1:
            raise ValueError(f"round_size must be >= 1, got {round_size}")
        self.world = world_size()
        self.round_size = int(round_size)
        self.rounds = math.ceil(math.ceil(total / self.world) / self.round_size) if total > 0 else 0
        self.done_rounds = 0
        self.pending: List[Any] = []
        self.write = write
        self.what = what

    def __enter__(self) -> "RoundGatherer":
        return self

    def add(self, result: Any) -> None:
        self.pending.append(result)
        if len(self.pending) >= self.round_size:
            self._round()

    def _round(self) -> None:
        mine, self.pending = self.pending, []
        if self.world == 1:
            if mine:
                self.write(mine)
        else:
            gathered = gather_to_main(mine, f"gathering {self.what} (round {self.done_rounds + 1}/{self.rounds})")
            if gathered is not None:
                merged = [r for part in gathered for r in part]
                if merged:
                    self.write(merged)
        self.done_rounds += 1

    def finish(self) -> None:
        while self.done_rounds < self.rounds or (self.world == 1 and self.pending):
            self._round()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif is_main() and self.pending:
            mine, self.pending = self.pending, []
            self.write(mine)


# -- seeds ---------------------------------------------------------------------------------------
def rank_seed(seed: int, rank_: int, iteration: int = 0) -> int:
    """The seed of a rank's own random stream (RPN / RoI sampling). Rank 0 at iteration 0
    keeps ``seed`` itself, so a one-process run draws what it drew before; the others get
    seeds mixed from (seed, rank, iteration) by SeedSequence (no overlap with neighbours)."""
    if rank_ == 0 and iteration == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) % 2**63, int(rank_), int(iteration)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


# -- SyncBatchNorm -------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: each rank's output is the sum of every rank's
    input, so the gradient of an input is the sum of every rank's output gradient (the job's
    objective is the sum of the ranks' losses; DDP then averages the parameter gradients)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        with collective("SyncBatchNorm statistics"):
            dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        with collective("SyncBatchNorm gradients"):
            dist.all_reduce(out)
        return out


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch of every process, for the
    CPU (gloo), where torch's SyncBatchNorm refuses to run. Mean and variance are summed
    across ranks with differentiable all-reduces (two passes: mean first, then the squared
    deviations from it, which keeps the variance accurate), so autograd's backward sums the
    gradient terms across ranks as the synchronised normalisation requires. In eval mode,
    or outside a process group, it is plain BatchNorm. Same parameters, buffers and state
    dict as BatchNorm2d."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected a 4D input (N, C, H, W), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        local = x.transpose(0, 1).reshape(c, -1).float()  # (C, n_local)
        # One all-reduce for the sums and the element count (ranks may pad to other sizes).
        sums = all_reduce(torch.cat([local.sum(1), local.new_tensor([local.shape[1]])]))
        count = float(sums[c].detach())
        if count <= 1:
            raise TrainingError("SyncBatchNorm: a batch of one value per channel has no variance")
        mean = sums[:c] / count
        var = all_reduce(((local - mean[:, None]) ** 2).sum(1)) / count  # biased, for normalising
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = (1, c, 1, 1)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _sync_bn_like(module: nn.BatchNorm2d, device: torch.device) -> nn.modules.batchnorm._BatchNorm:
    kind = nn.SyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm
    new = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if module.affine:
        new.weight, new.bias = module.weight, module.bias  # the same Parameter objects
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def has_syncbn(model: nn.Module) -> bool:
    """Whether the model has ``norm: syncbn`` layers that train (frozen ones do not count)."""
    # Imported here: the launch and collective helpers stay free of torchvision's import time.
    from detkit.modeling.backbones.common import SyncableBatchNorm2d, is_frozen_norm

    return any(isinstance(m, SyncableBatchNorm2d) and not is_frozen_norm(m) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> int:
    """Replace every ``norm: syncbn`` layer (``SyncableBatchNorm2d``) that trains by a
    synchronised one: torch's SyncBatchNorm on CUDA, ``CPUSyncBatchNorm`` elsewhere. Frozen
    ones stay (their statistics never change). Parameters are kept (an optimizer built before
    still holds them). -> how many were replaced. Call it before wrapping in DDP."""
    from detkit.modeling.backbones.common import SyncableBatchNorm2d, is_frozen_norm

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SyncableBatchNorm2d) and not is_frozen_norm(child):
                setattr(parent, name, _sync_bn_like(child, device))
                replaced += 1
    return replaced


SYNCBN_NEEDS_PROCESSES = (
    "norm: syncbn needs distributed training: launch with torchrun --nproc_per_node=N (N > 1), "
    "or use norm: bn on one process"
)


def check_syncbn(model: nn.Module) -> None:
    """``norm: syncbn`` trains only in a distributed run: on one process it would silently be
    plain BatchNorm. One line that says what to do instead."""
    if has_syncbn(model) and not is_distributed():
        raise TrainingError(SYNCBN_NEEDS_PROCESSES)


# -- DDP -----------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged across ranks in backward);
    the model itself unchanged outside a process group. Frozen parameters (requires_grad
    False: frozen stages, FrozenBatchNorm) are not synchronised, as they never change.
    ``find_unused_parameters`` only for models that leave trainable parts unused in some
    iterations (DDP then walks the graph every iteration)."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict = {"find_unused_parameters": find_unused_parameters}
    if device.type == "cuda":
        kwargs.update(device_ids=[device.index], output_device=device.index)
    with collective("wrapping the model in DDP (broadcasting rank 0's weights)"):
        return DistributedDataParallel(model, **kwargs)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP broadcasts them at the
    start of each forward, but each rank's own batch updates them after that: before an
    evaluation (sharded across the ranks) every rank must hold the model rank 0 saves."""
    if not is_distributed():
        return
    with collective("synchronising the model's buffers"):
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

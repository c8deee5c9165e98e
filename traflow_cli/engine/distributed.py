"""PyTorch DDP under torchrun: process-group set-up, rank helpers, reductions.

Conventions every job keeps, so that N processes compute what one process would:
- one global batch per step, drawn from a generator seeded by (seed, step); rank r takes its
  contiguous rows (jobs.common.rank_rows), so a loss that is a mean over a rank's rows, averaged
  over ranks by DDP's gradient all-reduce, is the mean over the global batch;
- anything computed from gradients outside backward (TraFlow's adaptive lambda) is averaged
  with `all_mean` before it is used, so every rank holds the global-batch value;
- rank 0 alone writes files (checkpoints, metrics, caches) and then waits at a barrier.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Newer torch renames DDP's broadcast_buffers (and warns on the old name).
_NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else "broadcast_buffers")

_control: dist.ProcessGroup | None = None  # gloo group for host-side flags under NCCL

# A collective waits this long for a slow rank (e.g. rank 0 writing a large checkpoint).
TIMEOUT = timedelta(minutes=30)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_process_group(device_type: str) -> tuple[int, int, int]:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); returns (rank, world, local rank).

    On CUDA the caller sets the device first, so each rank's NCCL communicator uses its own GPU.
    Ranks other than 0 print nothing on stdout: what a script reads there is rank 0's result.
    """
    global _control
    if not launched_by_torchrun():
        return 0, 1, 0
    if not dist.is_initialized():
        kwargs = {}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank())
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=TIMEOUT, **kwargs)
        atexit.register(shutdown)
        # Host-side flags (stop requests) travel over gloo: reading an NCCL result back would
        # make the CPU wait for the GPU every step.
        _control = dist.new_group(backend="gloo") if device_type == "cuda" else None
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # kept open for the process's life
    return dist.get_rank(), dist.get_world_size(), local_rank()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap a module when running under torchrun; otherwise return it unchanged.

    broadcast_buffers=False: our networks' buffers are constants (no batch-norm statistics),
    and a buffer broadcast inside forward is an in-place copy that torch.func.jvp (the
    velocity term's dG/ds) refuses. Gradients are bucket views: no second copy of them.
    """
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True,
                                               **{_NO_BUFFER_SYNC: False})


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a host-side all-reduce; no device sync)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


def all_mean(x: Tensor) -> Tensor:
    """The mean of x over ranks, on every rank, detached (x itself without DDP)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average scalar metrics over ranks (identity without DDP)."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    stacked = all_mean(torch.stack([values[n].float() for n in names]))
    return dict(zip(names, stacked, strict=True))


def shard(count: int) -> slice:
    """This rank's contiguous share of `count` items of work (the last share may be short)."""
    per = math.ceil(count / world_size())
    return slice(min(count, rank() * per), min(count, (rank() + 1) * per))


def gather_shards(part: Tensor, count: int, dim: int = 0) -> Tensor:
    """Concatenate every rank's `shard(count)` rows of a tensor along `dim`, on every rank."""
    if not is_distributed():
        return part
    per = math.ceil(count / world_size())
    pad = list(part.shape)
    pad[dim] = per - part.shape[dim]
    padded = torch.cat([part, part.new_zeros(pad)], dim=dim).contiguous()
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces, dim=dim).narrow(dim, 0, count)


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown() -> None:
    """Leave the group while the interpreter is whole: gloo's worker threads must not outlive it.

    Collected first, so that DDP's reducer (and the work objects it holds) dies before its
    process group; then every rank waits for the others, then each destroys its group.
    """
    if not is_distributed():
        return
    global _control
    gc.collect()
    barrier()
    dist.destroy_process_group()
    _control = None

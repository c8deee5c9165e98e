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
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
    if not launched_by_torchrun():
        return 0, 1, 0
    if not dist.is_initialized():
        kwargs = {}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank())
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=TIMEOUT, **kwargs)
        atexit.register(shutdown)
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
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


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
    if is_distributed():
        dist.destroy_process_group()

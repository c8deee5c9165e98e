"""Which items each rank trains on at each step: a pure function of (seed, step), so resumable.

The data stream is one endless sequence of positions 0, 1, 2, ...; position p falls in epoch
p // N, and each epoch is its own permutation of range(N) seeded by (seed, epoch). Step s
trains on positions s*G .. s*G+G-1 (G the global batch), crossing epoch boundaries as needed,
and rank r takes the r-th contiguous slice of those G. Nothing depends on how the run got to
step s, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.data import Dataset

from traflow_cli.data.images.dataset import ImageDataset
from traflow_cli.seeding import derive_seed

_STREAM_TAG = 0x0DA7A5EED  # keeps data-order seeds apart from other seeds derived from `seed`


@lru_cache(maxsize=4)
def _permutation(num_items: int, seed: int, epoch: int) -> Tensor:
    """Cached epoch order [num_items] int64; never handed out, as callers could mutate it."""
    # Always on CPU: CPU and CUDA generators give different streams for the same seed. torch's
    # CPU generator keeps only 32 bits of the seed; a hash of (seed, epoch) still makes nearby
    # epochs and seeds unrelated, which is all the ordering needs.
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, epoch, _STREAM_TAG))
    return torch.randperm(num_items, generator=generator)


def epoch_permutation(num_items: int, *, seed: int, epoch: int) -> Tensor:
    """The order [num_items] int64 in which epoch `epoch` visits the items."""
    return _permutation(num_items, seed, epoch).clone()


def stream_indices(num_items: int, *, seed: int, start: int, count: int) -> Tensor:
    """Item indices [count] int64 at stream positions start .. start+count-1."""
    pieces, pos, end = [], start, start + count
    while pos < end:
        epoch, offset = divmod(pos, num_items)
        take = min(end - pos, num_items - offset)
        pieces.append(_permutation(num_items, seed, epoch)[offset : offset + take])
        pos += take
    # cat copies, so the cached permutations are never aliased by what we return.
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def batch_indices(
    num_items: int, *, step: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
) -> Tensor:
    """Indices [global_batch // world_size] of dataset items for this rank at this training step."""
    if num_items <= 0:
        raise ValueError(f"batch_indices: the dataset is empty (num_items={num_items})")
    if step < 0 or global_batch <= 0:
        raise ValueError(f"batch_indices: need step >= 0 and global_batch > 0, got step={step}, "
                         f"global_batch={global_batch}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"batch_indices: rank={rank} is not in [0, world_size={world_size})")
    if global_batch % world_size != 0:
        raise ValueError(f"batch_indices: global_batch={global_batch} is not divisible by "
                         f"world_size={world_size}; use a multiple of the number of processes")
    local = global_batch // world_size
    return stream_indices(num_items, seed=seed, start=step * global_batch + rank * local,
                          count=local)


def load_batch(
    dataset: ImageDataset | Dataset[tuple[Tensor, int]], indices: Tensor | Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Images [B, C, H, W] uint8 and labels [B] int64 (-1 when unlabelled) for item indices."""
    if isinstance(dataset, ImageDataset):  # preloaded tensor or a vectorised draw when it has one
        return dataset.get_batch(indices)
    items = [dataset[int(i)] for i in torch.as_tensor(indices).reshape(-1)]
    if not items:
        raise ValueError("load_batch: no indices given")
    images = torch.stack([image for image, _ in items])
    return images, torch.tensor([int(label) for _, label in items], dtype=torch.int64)

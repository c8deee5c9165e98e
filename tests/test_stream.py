"""The data stream: a pure, shardable function of (seed, step) that walks epoch permutations."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from traflow_cli.data import stream
from traflow_cli.data.shapes import ShapesDataset
from traflow_cli.data.stream import (
    batch_indices,
    epoch_permutation,
    load_batch,
    stream_indices,
)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_items", [37, 64, 1000])
def test_union_over_ranks_is_the_global_batch(world_size: int, num_items: int) -> None:
    for step in [0, 1, 5, 17]:  # 37 items with batch 16 crosses epoch boundaries
        whole = batch_indices(num_items, step=step, global_batch=16, seed=3)
        parts = [
            batch_indices(num_items, step=step, global_batch=16, seed=3, rank=r,
                          world_size=world_size)
            for r in range(world_size)
        ]
        assert all(p.shape == (16 // world_size,) for p in parts)
        assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize(("num_items", "global_batch"), [(100, 10), (100, 7), (13, 40)])
def test_every_epoch_visits_every_item_once(num_items: int, global_batch: int) -> None:
    steps = 3 * num_items // global_batch + 2
    seen = torch.cat([
        batch_indices(num_items, step=s, global_batch=global_batch, seed=0) for s in range(steps)
    ])
    for epoch in range(len(seen) // num_items):
        chunk = seen[epoch * num_items : (epoch + 1) * num_items]
        assert torch.equal(chunk.sort().values, torch.arange(num_items))
        assert torch.equal(chunk, epoch_permutation(num_items, seed=0, epoch=epoch))
    assert not torch.equal(seen[:num_items], seen[num_items : 2 * num_items])  # reshuffled


def test_a_resumed_run_sees_the_same_batches() -> None:
    def run(start: int, stop: int) -> list[torch.Tensor]:
        return [batch_indices(500, step=s, global_batch=64, seed=11, rank=1, world_size=2)
                for s in range(start, stop)]

    uninterrupted = run(0, 40)
    stream._permutation.cache_clear()  # a fresh process has no cached permutations
    resumed = run(23, 40)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[23:], resumed, strict=True))


def test_seeds_and_epochs_give_different_orders() -> None:
    a = batch_indices(1000, step=0, global_batch=100, seed=0)
    b = batch_indices(1000, step=0, global_batch=100, seed=1)
    assert not torch.equal(a, b)
    assert not torch.equal(epoch_permutation(1000, seed=0, epoch=0),
                           epoch_permutation(1000, seed=0, epoch=1))


def test_returned_indices_do_not_alias_the_cache() -> None:
    first = stream_indices(50, seed=5, start=0, count=50)
    first.zero_()
    perm = epoch_permutation(50, seed=5, epoch=0)
    perm.zero_()
    assert torch.equal(stream_indices(50, seed=5, start=0, count=50).sort().values,
                       torch.arange(50))


def test_bad_shapes_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        batch_indices(100, step=0, global_batch=10, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2"):
        batch_indices(100, step=0, global_batch=10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        batch_indices(0, step=0, global_batch=10, seed=0)


class _ListDataset(Dataset[tuple[torch.Tensor, int]]):
    """A plain map-style dataset (not an ImageDataset) of constant images."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), i, dtype=torch.uint8), i % 3


def test_load_batch_preloaded_drawn_and_plain_datasets_agree() -> None:
    indices = batch_indices(300, step=4, global_batch=32, seed=2)
    drawn = ShapesDataset(300, use_labels=True)
    images, labels = load_batch(drawn, indices)
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (32,) and labels.dtype == torch.int64
    preloaded = ShapesDataset(300, use_labels=True).preload()
    images2, labels2 = load_batch(preloaded, indices)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert torch.equal(images[3], drawn[int(indices[3])][0])

    plain_images, plain_labels = load_batch(_ListDataset(), torch.tensor([4, 1]))
    assert plain_images[:, 0, 0, 0].tolist() == [4, 1] and plain_labels.tolist() == [1, 1]

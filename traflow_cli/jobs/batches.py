"""Training batches as a pure function of the step: toy draws or dataset indices, per rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from traflow_cli.data.toy import sample_toy
from traflow_cli.engine.runtime import Runtime
from traflow_cli.errors import UserError
from traflow_cli.jobs.common import rank_rows
from traflow_cli.seeding import generator_for
from traflow_cli.specs import DataSpec, SpecError

# (step) -> (data [b, ...] on the device, labels [b] or None) for this rank's share.
BatchSource = Callable[[int], tuple[Tensor, Tensor | None]]


def make_batch_source(data: DataSpec, *, seed: int, global_batch: int,
                      runtime: Runtime, net_classes: int = 0) -> BatchSource:
    """The batches of `data` for this rank; `net_classes` is the network's class count, which
    every label of a labelled dataset must be below (checked here, before any step)."""
    rows = rank_rows(global_batch, runtime)
    if data.is_toy:
        def toy_batch(step: int) -> tuple[Tensor, Tensor | None]:
            # Its own stream (tag 1), so data draws never collide with the loss's draws.
            points = sample_toy(data.name, global_batch, generator_for(seed, 1, step))
            return points[rows].to(runtime.device), None

        return toy_batch

    from traflow_cli.data.images import hflip_batch, open_image_dataset, to_model_range
    from traflow_cli.data.stream import batch_indices, load_batch

    try:
        dataset = open_image_dataset(data.name, path=data.path, resolution=data.resolution,
                                     download=data.download, use_labels=data.use_labels)
    except UserError:  # a file that is missing or damaged: its own line names it
        raise
    except ValueError as err:  # settings the dataset cannot meet (resolution, labels): one line
        raise SpecError(f"data: {err}") from None
    found = getattr(dataset, "num_classes", 0)
    if data.use_labels and net_classes and found > net_classes:
        raise SpecError(f"data.path: {data.path or data.name} has labels up to {found - 1}, but "
                        f"net.num_classes is {net_classes}; set net.num_classes={found} (a new "
                        "network) or relabel the data")
    if data.preload and hasattr(dataset, "preload"):
        dataset.preload()

    def image_batch(step: int) -> tuple[Tensor, Tensor | None]:
        index = batch_indices(len(dataset), step=step, global_batch=global_batch, seed=seed,
                              rank=runtime.rank, world_size=runtime.world_size)
        images, labels = load_batch(dataset, index)
        x = to_model_range(images)
        if data.hflip:
            x = hflip_batch(x, generator_for(seed, 2, step, runtime.rank))
        return runtime.place_batch(x), (labels.to(runtime.device) if data.use_labels else None)

    return image_batch


def global_normal(shape: tuple[int, ...], global_batch: int, rows: slice,
                  generator: torch.Generator) -> Tensor:
    """Noise for the whole global batch from one generator, this rank's rows of it."""
    return torch.randn((global_batch, *shape), generator=generator,
                       device=generator.device)[rows]

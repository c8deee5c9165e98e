"""Device, precision and compilation choices, resolved once per process."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from traflow_cli.engine.distributed import init_process_group


class RuntimeSetupError(RuntimeError):
    """A runtime request the machine cannot meet (one line: what and how to fix)."""


@dataclass
class Runtime:
    """Where a job runs and with which speed options; CPU runs keep float32 and eager mode."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    compile: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when asked; master weights and EMA stay float32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def place(self, module: nn.Module) -> nn.Module:
        """Move a module to the device (channels_last for image networks when enabled)."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def place_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def maybe_compile(self, fn: Callable) -> Callable:
        return torch.compile(fn) if self.compile else fn


def _on(choice: str, default: bool) -> bool:
    return default if choice == "auto" else choice == "on"


def setup_runtime(*, device: str = "auto", precision: str = "auto", compile: str = "auto",
                  channels_last: str = "auto", cuda_graphs: str = "auto", tf32: bool = True,
                  image_model: bool = True) -> Runtime:
    """Resolve "auto" choices for this machine and join a torchrun group if launched by one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError("runtime.device: 'cuda' asked for but no CUDA device is visible; "
                                "use --device cpu or --device auto")
    dev_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    rank, world, local_rank = init_process_group(dev_type)
    if dev_type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    else:
        dev = torch.device("cpu")
    cuda = dev_type == "cuda"
    if precision == "bf16" and not cuda:
        raise RuntimeSetupError("runtime.precision: bf16 is for CUDA runs; use fp32 on CPU")
    amp = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and cuda)) else None
    return Runtime(device=dev, rank=rank, world_size=world, amp_dtype=amp,
                   compile=_on(compile, cuda), channels_last=_on(channels_last, cuda) and image_model,
                   cuda_graphs=_on(cuda_graphs, cuda))


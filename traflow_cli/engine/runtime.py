"""Device, precision and compilation choices, resolved once per process.

"auto" turns a speed option on only where it is safe and pays: on CUDA, bf16 autocast, TF32,
channels_last for image networks, torch.compile and CUDA-graph replay of fixed-shape sampling
loops. A CPU run stays float32 and eager unless a spec asks otherwise (compile=on works on CPU
through inductor when a C compiler is present; bf16 and CUDA graphs are refused or ignored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from traflow_cli.engine.distributed import init_process_group, local_rank
from traflow_cli.errors import UserError


class RuntimeSetupError(UserError, RuntimeError):
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
    tf32: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

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

    def place_batch(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def maybe_compile(self, fn: Callable, *, mode: str | None = None) -> Callable:
        """torch.compile(fn) when runtime.compile is on (inductor; default mode), else fn."""
        return torch.compile(fn, mode=mode) if self.compile else fn

    def fixed_shape(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """A fixed-shape inference loop x -> y, replayed from a CUDA graph when cuda_graphs is on.

        For sampling loops whose control flow does not read tensor values (the student's jumps,
        fixed-step teacher solvers); not for adaptive RK45, which decides on the host.
        """
        return CudaGraphed(fn) if self.cuda_graphs and self.is_cuda else fn

    def describe(self) -> dict[str, Any]:
        """The resolved choices, for run records and benchmark reports."""
        return {"device": str(self.device), "world_size": self.world_size,
                "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
                "compile": self.compile, "channels_last": self.channels_last,
                "cuda_graphs": self.cuda_graphs, "tf32": self.tf32}


@dataclass
class CudaGraphed:
    """fn(x) captured once per input shape into a CUDA graph, then replayed: one launch a call.

    The input is copied into a static buffer and the output copied out, so callers see plain
    tensors. Capture follows torch.cuda.graphs' rules: warm-up iterations on a side stream
    first (this also triggers any torch.compile compilation), autocast's weight cache off while
    capturing, no host synchronisation inside fn, randomness only from the default generator.
    """

    fn: Callable[[Tensor], Tensor]
    warmup: int = 3
    _graphs: dict[tuple, tuple[Tensor, Any, Tensor]] = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        static_in, graph, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: Tensor) -> tuple[Tensor, Any, Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        amp = torch.is_autocast_enabled("cuda")
        no_cache = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                   cache_enabled=False) if amp else contextlib.nullcontext())
        with torch.no_grad(), no_cache, torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return static_in, graph, static_out


def _on(choice: str, default: bool) -> bool:
    return default if choice == "auto" else choice == "on"


def _set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (newer torch has a per-backend API)."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def resolve_device(device: str) -> torch.device:
    """runtime.device ("cpu", "cuda" or "auto") -> this process's device (its GPU under torchrun)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError("runtime.device: 'cuda' asked for but no CUDA device is visible; "
                                "use --device cpu or --device auto")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def setup_runtime(*, device: str = "auto", precision: str = "auto", compile: str = "auto",
                  channels_last: str = "auto", cuda_graphs: str = "auto", tf32: bool = True,
                  image_model: bool = True) -> Runtime:
    """Resolve "auto" choices for this machine and join a torchrun group if launched by one."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if precision == "bf16" and not cuda:
        raise RuntimeSetupError("runtime.precision: bf16 is for CUDA runs; use fp32 on CPU")
    if cuda:
        # Before joining the group, so that each rank's NCCL communicator lives on its own GPU.
        torch.cuda.set_device(dev)
        _set_tf32(tf32)
        torch.backends.cudnn.benchmark = True
    rank, world, _ = init_process_group(dev.type)
    amp = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and cuda)) else None
    return Runtime(device=dev, rank=rank, world_size=world, amp_dtype=amp,
                   compile=_on(compile, cuda), channels_last=_on(channels_last, cuda) and image_model,
                   cuda_graphs=_on(cuda_graphs, cuda) and cuda, tf32=tf32 and cuda)

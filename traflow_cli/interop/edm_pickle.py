"""Open NVlabs/edm network pickles as data, without running anything in them.

EDM's ``torch_utils.persistence`` pickles every network module as the call
``_reconstruct_persistent_obj(meta)``, meta = {type: "class", version, module_src (the whole
source of ``training/networks.py``), class_name, state (the module's ``__dict__``)}, and EDM's
loader ``exec``s ``module_src``: opening an untrusted snapshot runs its code. Here a restricted
unpickler maps each global such a file needs to a data-only stand-in and refuses every other
global with one line naming it:

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> ``PersistentObject`` (class name
  and state; the source is never kept, let alone run);
- ``torch.storage._load_from_bytes`` -> the inner ``torch.save`` bytes loaded by torch's
  weights-only loader; ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter[_with_state]``
  -> a tensor view of that storage, bounds checked (hooks and metadata must be empty);
- ``collections.OrderedDict``; ``torch.nn`` containers (``ModuleDict`` ...) -> ``ModuleState``;
- numpy scalars (``numpy.core`` and ``numpy._core``) and ``numpy.dtype`` -> Python numbers
  (numeric kinds only); ``builtins.set``/``frozenset`` and ``dnnlib.util.EasyDict`` (plain
  containers that older pickle protocols and EDM's config dicts name) -> themselves / a dict.

Every other global (``os.system``, ``builtins.exec``, ...) is refused before it is called.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from traflow_cli.errors import one_line
from traflow_cli.interop.rectified_flow import CheckpointFormatError

__all__ = ["ModuleState", "PersistentObject", "UnsafePickleError", "load_network_pickle"]


class UnsafePickleError(CheckpointFormatError):
    """A pickle names a global that an EDM network snapshot never needs; nothing was run."""


class _BadContent(ValueError):
    """A stand-in was handed something no EDM pickle holds (turned into one line by the loader)."""


@dataclass
class PersistentObject:
    """One ``persistence``-pickled module (or loss, or augment pipe), as data."""

    class_name: str
    state: dict[str, Any] = field(repr=False)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs", {})
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    @property
    def init_args(self) -> tuple[Any, ...]:
        args = self.state.get("_init_args", ())
        return tuple(args) if isinstance(args, tuple | list) else ()


class ModuleState:
    """A plain ``torch.nn`` container (ModuleDict, ModuleList, Sequential), as data: its state."""

    container = "Module"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _BadContent(f"torch.nn.{self.container} state is a {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.container}>"


def _container(name: str) -> type[ModuleState]:
    return type(name, (ModuleState,), {"container": name})


def _persistent(meta: Any) -> PersistentObject:
    if not (isinstance(meta, dict) and meta.get("type") == "class"
            and isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)):
        raise _BadContent("a persistence record without type 'class', class_name and state")
    return PersistentObject(class_name=meta["class_name"], state=meta["state"])


def _load_storage(data: Any) -> torch.storage.TypedStorage:
    if not isinstance(data, bytes):
        raise _BadContent(f"storage bytes expected, found {type(data).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation, legacy-format notes
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _BadContent(f"a storage expected, found {type(storage).__name__}")
    return storage


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _BadContent(f"tensor {what} must be non-negative integers, found {values!r}")
    return tuple(values)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _BadContent(f"tensor storage expected, found {type(storage).__name__}")
    if hooks or metadata:
        raise _BadContent("tensor with backward hooks or metadata")
    (offset,) = _ints([offset], "offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _BadContent(f"tensor size {size} and stride {stride} differ in length")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        length = storage.size()
        if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= length:
            raise _BadContent(f"tensor of size {list(size)} reaches past its storage ({length})")
        tensor = torch.empty(0, dtype=storage.dtype)
        tensor.set_(storage._untyped_storage, offset, size, stride)
    return tensor


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None,
                       state: Any = None) -> Tensor:
    if not isinstance(data, Tensor) or hooks or state:
        raise _BadContent("a parameter without its tensor, or with hooks or state")
    return data


class _NumpyDType:
    """numpy.dtype(name, align, copy) followed by BUILD (byte order): only name and order kept."""

    def __init__(self, name: Any, *_: Any) -> None:
        if not isinstance(name, str):
            raise _BadContent(f"numpy dtype name expected, found {type(name).__name__}")
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        try:
            dtype = np.dtype(self.name)
        except TypeError as err:
            raise _BadContent(f"unknown numpy dtype {self.name!r}") from err
        if dtype.kind not in "biufc":
            raise _BadContent(f"numpy dtype {self.name!r} is not numeric")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | complex | bool:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise _BadContent("a numpy scalar without a numeric dtype and its bytes")
    np_dtype = dtype.to_numpy()
    if len(data) != np_dtype.itemsize:
        raise _BadContent(f"numpy scalar of {len(data)} bytes for dtype {dtype.name!r}")
    return np.frombuffer(data, dtype=np_dtype)[0].item()


class _EasyDict(dict):
    """dnnlib.util.EasyDict read back as a plain dict (its attribute access is not needed)."""


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): _container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _container("Sequential"),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDType,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}


class _SnapshotUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves globals from the allow-list above, and nothing else."""

    def __init__(self, file: BinaryIO, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load the global {module}.{name}, which an EDM network "
                "snapshot never needs (nothing in the file was run); import only snapshots "
                "written by NVlabs/edm")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise _BadContent("a persistent id (torch.save's format, not a network pickle)")


def load_network_pickle(path: str | Path) -> Any:
    """Unpickle an EDM network snapshot as data: dicts, PersistentObject, ModuleState, tensors.

    Raises UnsafePickleError for any global outside the allow-list, CheckpointFormatError (one
    line) for a missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"expected an EDM network pickle at {path}, found no such file")
    if zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found a torch.save zip archive; import "
            "official Rectified Flow .pth files with 'traflow teacher import rectified-flow'")
    try:
        with path.open("rb") as handle:
            return _SnapshotUnpickler(handle, path).load()
    except CheckpointFormatError:
        raise
    except _BadContent as err:
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found {err}") from None
    except Exception as err:  # truncation (EOF), corrupt opcodes, wrong argument types, ...
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found a file that is truncated or not a "
            f"network pickle ({type(err).__name__}: {one_line(err)[:120]})") from None

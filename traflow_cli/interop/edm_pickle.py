"""Open NVlabs/edm network pickles as data, without running anything in them.

EDM's ``torch_utils.persistence`` pickles every network module as the call
``_reconstruct_persistent_obj(meta)``, meta = {type: "class", version, module_src (the whole
source of ``training/networks.py``), class_name, state (the module's ``__dict__``)}, and EDM's
loader ``exec``s ``module_src``: opening an untrusted snapshot runs its code. Here a restricted
unpickler maps each global such a file needs to a data-only stand-in and refuses every other
global with one line naming it:

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> ``PersistentObject`` (class name
  and state; the source is never kept, let alone run);
- ``torch.storage._load_from_bytes`` -> the inner legacy ``torch.save`` blob read by
  ``tensor_pickle`` (the storage is exactly its bytes); ``torch._utils._rebuild_tensor_v2`` /
  ``_rebuild_parameter[_with_state]`` -> a view of that storage, bounds checked (no stride-0
  or overlapping views, all views within a budget set by the file's size; hooks and metadata
  must be empty), and checked again after unpickling;
- ``collections.OrderedDict``; ``torch.nn`` containers (``ModuleDict`` ...) -> ``ModuleState``;
- numpy scalars (``numpy.core`` and ``numpy._core``) and ``numpy.dtype`` -> Python numbers
  (numeric kinds only); ``builtins.set``/``frozenset`` and ``dnnlib.util.EasyDict`` (plain
  containers that older pickle protocols and EDM's config dicts name) -> themselves / a dict.

Every other global (``os.system``, ``builtins.exec``, ...) is refused before it is called, and
BUILD (``__setstate__``) reaches only ``ModuleState`` and the numpy dtype stand-in, never a
tensor: see ``tensor_pickle`` for the opcodes it guards.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traflow_cli.errors import one_line
from traflow_cli.interop.rectified_flow import CheckpointFormatError
from traflow_cli.interop.tensor_pickle import (
    BadContent,
    BoundedReader,
    FileStorage,
    TensorPickleReader,
    read_legacy_storage,
    view_budget,
)

__all__ = ["ModuleState", "PersistentObject", "UnsafePickleError", "load_network_pickle"]


class UnsafePickleError(CheckpointFormatError):
    """A pickle names a global that an EDM network snapshot never needs; nothing was run."""


_BadContent = BadContent  # a stand-in was handed something no EDM pickle holds (one line)


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


# Strings name the reader's own bounds-checked functions (see TensorPickleReader).
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type | str] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.storage", "_load_from_bytes"): "storage_bytes",
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
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


def _refusal(source: Path) -> Callable[[str, str], UnsafePickleError]:
    def refuse(module: str, name: str) -> UnsafePickleError:
        return UnsafePickleError(
            f"{source}: refused to load the global {module}.{name}, which an EDM network "
            "snapshot never needs (nothing in the file was run); import only snapshots "
            "written by NVlabs/edm")
    return refuse


class _SnapshotUnpickler(TensorPickleReader):
    """TensorPickleReader over the allow-list above: storages come from the legacy torch.save
    blobs inside the pickle, and BUILD reaches only the stand-ins that take a state."""

    def __init__(self, file: BoundedReader, source: Path, file_bytes: int) -> None:
        refuse = _refusal(source)
        allowed = {key: self._load_storage if value == "storage_bytes" else value
                   for key, value in _ALLOWED.items()}
        super().__init__(file, allowed=allowed, refuse=refuse,
                         byte_budget=view_budget(file_bytes),
                         buildable=(ModuleState, _NumpyDType))
        self.source = source

    def _load_storage(self, data: Any) -> FileStorage:
        if not isinstance(data, bytes):
            raise _BadContent(f"storage bytes expected, found {type(data).__name__}")
        return self.add_storage(read_legacy_storage(data, _refusal(self.source)))


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
        size = path.stat().st_size
        with path.open("rb") as handle:
            unpickler = _SnapshotUnpickler(BoundedReader(handle, size), path, size)
            snapshot = unpickler.load()
        unpickler.verify()
        return snapshot
    except CheckpointFormatError:
        raise
    except _BadContent as err:
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found {err}") from None
    except RecursionError:
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found structures nested too deeply "
            "to be a network pickle") from None
    except MemoryError:
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found one that needs more memory than "
            "a network pickle of its size can") from None
    except Exception as err:  # truncation (EOF), corrupt opcodes, wrong argument types, ...
        raise CheckpointFormatError(
            f"expected an EDM network pickle at {path}, found a file that is truncated or not a "
            f"network pickle ({type(err).__name__}: {one_line(err)[:120]})") from None

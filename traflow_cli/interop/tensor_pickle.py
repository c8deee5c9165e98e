"""Tensors out of untrusted pickles, as data: nothing in the file runs, and no byte that is not
in the file reaches a tensor.

Both foreign formats traflow imports are pickles that hold tensors: an NVlabs/edm network
pickle (``edm_pickle``: each storage is a legacy ``torch.save`` blob inside the pickle) and a
``torch.save`` zip archive (an official Rectified Flow ``.pth``: ``data.pkl`` beside one member
per storage). ``torch.load`` is not used for either, because its unpicklers let a file change a
tensor after it was built: a BUILD opcode on a tensor calls ``set_``, which grows the storage
past the bytes in the file (uninitialised heap memory as weights). Here:

- pickle's pure-Python unpickler runs with every opcode that calls into an object guarded:
  globals come from an allow-list only (``find_class``), REDUCE / NEWOBJ / OBJ / INST call only
  allow-listed callables, BUILD (``__setstate__``) reaches only the stand-in types that ask for
  it (a tensor never), SETITEM(S) only dicts, APPEND(S) only lists, ADDITEMS only sets;
- a storage is exactly the bytes the file holds for it (its declared size checked against
  them); a tensor is a view inside its storage whose elements never overlap (no stride-0 or
  self-overlapping views, so no view has more elements than its storage), and all views
  together stay within a budget set by the file's size, so a small file cannot expand;
- after unpickling, every tensor is checked again against the storage it was built on
  (same bytes, size, offset and strides): defence in depth against any path not foreseen;
- reads are bounded by the file: an opcode that claims more bytes than are left is
  "truncated", never a large allocation.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch import Tensor

__all__ = ["BadContent", "BoundedReader", "FileStorage", "StorageType", "TensorPickleReader",
           "check_no_expansion", "read_legacy_storage", "read_torch_zip", "view_budget"]

MAX_DIMS = 8                 # no network tensor has more dimensions
MAX_DIM_SIZE = 1 << 40       # keeps products of sizes exact and small enough to reason about
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
_KEY = re.compile(r"^[A-Za-z0-9_.]{1,64}$")


class BadContent(ValueError):
    """What the file holds is not what a tensor file holds (one phrase: "a ..."); the reader
    that called turns it into one line naming the file."""


def view_budget(file_bytes: int) -> int:
    """How many bytes all tensor views of a file may add up to: twice the file and 1 MiB (a
    legitimate file stores each tensor's bytes once; the slack covers small shared views)."""
    return 2 * int(file_bytes) + (1 << 20)


def check_no_expansion(tensors: Iterable[Tensor], file_bytes: int) -> None:
    """Raise BadContent when tensors (one object may be listed under many names) add up to
    more bytes than a file of `file_bytes` can hold (view_budget)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    if total > view_budget(file_bytes):
        raise BadContent(f"tensors that add up to {total} bytes, more than the file's "
                         f"{file_bytes} bytes hold (one tensor listed under many names?)")


@dataclass(frozen=True)
class StorageType:
    """``torch.FloatStorage`` and friends as they appear in a pickle: only the dtype is kept."""

    name: str
    dtype: torch.dtype


STORAGE_TYPES = {name: StorageType(name, dtype) for name, dtype in {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}.items()}


class BoundedReader:
    """A binary file seen through `read`/`readline` that never returns (or allocates) more than
    is left: an opcode claiming more bytes than the file holds is an error, not an allocation."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise BadContent(f"a file that is truncated (an entry claims {n} bytes where "
                             f"{self._left} are left)")
        data = self._handle.read(n)
        if len(data) != n:
            raise BadContent("a file that is truncated (it ended while being read)")
        self._left -= n
        return data

    def readline(self) -> bytes:
        line = self._handle.readline(self._left)
        self._left -= len(line)
        if not line.endswith(b"\n"):
            raise BadContent("a file that is truncated (a text opcode without its end of line)")
        return line

    @property
    def left(self) -> int:
        return self._left


@dataclass(frozen=True, eq=False)
class FileStorage:
    """A storage read from a file: exactly its bytes (`data`, a copy), seen as `dtype`."""

    data: torch.UntypedStorage
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.data.nbytes() // self.dtype.itemsize


def _storage_from_bytes(data: bytes, dtype: torch.dtype) -> FileStorage:
    """A storage holding exactly `data` (copied), read as `dtype`."""
    if len(data) % dtype.itemsize:
        raise BadContent(f"a storage of {len(data)} bytes, not a whole number of {dtype} values")
    untyped = (torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data
               else torch.UntypedStorage(0))
    return FileStorage(untyped, dtype)


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or len(values) > MAX_DIMS or not all(
            type(v) is int and 0 <= v <= MAX_DIM_SIZE for v in values):
        shown = repr(values)[:80] if isinstance(values, tuple | list | int) else type(values).__name__
        raise BadContent(f"a tensor whose {what} is not a short list of non-negative integers "
                         f"({shown})")
    return tuple(values)


def _check_view(size: tuple[int, ...], stride: tuple[int, ...], offset: int, length: int) -> None:
    """A view of `length` storage elements: inside it, and no element reached twice."""
    if len(size) != len(stride):
        raise BadContent(f"a tensor whose size {list(size)} and stride {list(stride)} differ in "
                         "length")
    if offset > length:
        raise BadContent(f"a tensor that starts past its storage (offset {offset}, storage of "
                         f"{length} elements)")
    if 0 in size:
        return
    reach = 0  # the furthest element the dimensions seen so far reach, from the offset
    for step, count in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
        if step <= reach:
            raise BadContent(f"a tensor view of size {list(size)} and stride {list(stride)} that "
                             "reads the same elements more than once (stride 0 or overlapping); "
                             "network weights never do")
        reach += (count - 1) * step
    if offset + reach >= length:
        raise BadContent(f"a tensor of size {list(size)} that reaches past its storage "
                         f"({length} elements)")


class TensorPickleReader(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, on purpose
    """pickle's pure-Python unpickler with every opcode that calls into an object guarded.

    `allowed` maps (module, name) to the object a global stands for; the strings
    "rebuild_tensor" and "rebuild_parameter" stand for this reader's bounds-checked versions
    of ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``. `buildable` are the
    (stand-in) types BUILD may hand their state to, through their own ``__setstate__``.
    `refuse(module, name)` makes the exception for a global outside the allow-list.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, file: BoundedReader, *, allowed: dict[tuple[str, str], Any],
                 refuse: Callable[[str, str], Exception], byte_budget: int,
                 buildable: tuple[type, ...] = (),
                 persistent: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        special = {"rebuild_tensor": self.rebuild_tensor,
                   "rebuild_parameter": self.rebuild_parameter}
        self._globals = {key: special.get(value, value) if isinstance(value, str) else value
                         for key, value in allowed.items()}
        self._callable_ids = {id(v) for v in self._globals.values() if callable(v)}
        self._refuse = refuse
        self._buildable = buildable
        self._persistent = persistent
        self.byte_budget = byte_budget
        self.viewed_bytes = 0
        self._storages: dict[int, tuple[FileStorage, int, int]] = {}
        self._tensors: list[tuple[Tensor, int, int, tuple[int, ...], tuple[int, ...], int]] = []

    # -- globals and calls ------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        target = self._globals.get((module, name))
        if target is None:
            raise self._refuse(module, name)
        return target

    def _check_callable(self, func: Any) -> None:
        if id(func) not in self._callable_ids:
            raise BadContent(f"a call of a {type(func).__name__} object, which is not one of the "
                             "allowed constructors")

    def load_reduce(self) -> None:
        self._check_callable(self.stack[-2])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_callable(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_callable(self.stack[-3])
        super().load_newobj_ex()

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        self._check_callable(klass)
        super()._instantiate(klass, args)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise BadContent("a persistent id (torch.save's format, not a network pickle)")
        return self._persistent(pid)

    # -- opcodes that call into the object on the stack -------------------------------------
    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, self._buildable):
            super().load_build()  # the stand-in's own __setstate__ checks what it is given
            return
        if isinstance(inst, dict) and isinstance(state, dict):
            self.stack.pop()  # attributes of a dict (a state dict's `_metadata`): never read
            return
        raise BadContent(f"a BUILD (__setstate__) on a {type(inst).__name__}, which no network "
                         "file needs (it could change a tensor after its bounds were checked)")

    def _target(self, kind: type, opcode: str) -> None:
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, kind):
            raise BadContent(f"{opcode} on a {type(target).__name__}, which only a "
                             f"{kind.__name__} takes")

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, "SETITEM")
        self.stack[-1][key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._target(dict, "SETITEMS")
        target = self.stack[-1]
        if len(items) % 2:
            raise BadContent("SETITEMS with a key but no value")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND")
        self.stack[-1].append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS")
        self.stack[-1].extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target(set, "ADDITEMS")
        self.stack[-1].update(items)

    # -- storages and tensors ---------------------------------------------------------------
    def add_storage(self, storage: FileStorage) -> FileStorage:
        """Register a storage made from the file's bytes; only registered ones back tensors."""
        self._storages[id(storage)] = (storage, storage.data.nbytes(), storage.data.data_ptr())
        return storage

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, hooks: Any = None, metadata: Any = None,
                       *extra: Any) -> Tensor:
        """``torch._utils._rebuild_tensor_v2``, bounds checked; hooks and metadata must be empty."""
        if id(storage) not in self._storages or extra:
            raise BadContent("a tensor without a storage read from the file")
        if hooks or metadata:
            raise BadContent("a tensor with backward hooks or metadata")
        (offset,) = _ints([offset], "offset")
        size, stride = _ints(size, "size"), _ints(stride, "stride")
        length = storage.numel
        _check_view(size, stride, offset, length)
        itemsize = storage.dtype.itemsize
        self.viewed_bytes += math.prod(size) * itemsize
        if self.viewed_bytes > self.byte_budget:
            raise BadContent(f"tensors that add up to more than {self.byte_budget} bytes, more "
                             "than the file's size can hold (views that expand a small file)")
        tensor = torch.empty(0, dtype=storage.dtype)
        # In bounds (checked above), so set_ never grows the storage.
        tensor.set_(storage.data, offset, size, stride)
        _, nbytes, ptr = self._storages[id(storage)]
        self._tensors.append((tensor, nbytes, ptr, size, stride, offset))
        return tensor

    def rebuild_parameter(self, data: Any, requires_grad: Any = False, hooks: Any = None,
                          state: Any = None) -> Tensor:
        if not isinstance(data, Tensor) or hooks or state:
            raise BadContent("a parameter without its tensor, or with hooks or state")
        return data

    def verify(self) -> None:
        """Every tensor still is the view it was built as, over the bytes read for it."""
        for tensor, nbytes, ptr, size, stride, offset in self._tensors:
            untyped = tensor.untyped_storage()
            if (untyped.nbytes() != nbytes or untyped.data_ptr() != ptr
                    or tuple(tensor.shape) != size or tuple(tensor.stride()) != stride
                    or tensor.storage_offset() != offset):
                raise BadContent("a tensor changed after it was read (its storage or view no "
                                 "longer matches the file's bytes)")


for _op, _method in ((pickle.REDUCE, TensorPickleReader.load_reduce),
                    (pickle.NEWOBJ, TensorPickleReader.load_newobj),
                    (pickle.NEWOBJ_EX, TensorPickleReader.load_newobj_ex),
                    (pickle.BUILD, TensorPickleReader.load_build),
                    (pickle.SETITEM, TensorPickleReader.load_setitem),
                    (pickle.SETITEMS, TensorPickleReader.load_setitems),
                    (pickle.APPEND, TensorPickleReader.load_append),
                    (pickle.APPENDS, TensorPickleReader.load_appends),
                    (pickle.ADDITEMS, TensorPickleReader.load_additems)):
    TensorPickleReader.dispatch[_op[0]] = _method


def _refuse_all(module: str, name: str) -> Exception:
    return BadContent(f"a header naming the global {module}.{name}")


def _plain_pickle(reader: BoundedReader) -> Any:
    """One small pickle of plain values (no globals): a legacy header entry."""
    return TensorPickleReader(reader, allowed={}, refuse=_refuse_all, byte_budget=0).load()


def read_legacy_storage(data: bytes, refuse: Callable[[str, str], Exception]
                        ) -> FileStorage:
    """The one storage in a legacy ``torch.save`` blob (what ``torch.storage._load_from_bytes``
    reads, as EDM pickles store each storage), its size checked against the bytes it holds.

    Layout: pickles of the magic number, the protocol version and sys_info, the main pickle
    (a persistent id ('storage', type, key, location, numel, view_metadata)), a pickled list of
    keys; then per key an 8-byte little-endian element count and the raw bytes.
    """
    if sys.byteorder != "little":
        raise BadContent("a storage on a big-endian machine, which traflow does not support")
    reader = BoundedReader(io.BytesIO(data), len(data))
    if _plain_pickle(reader) != LEGACY_MAGIC or _plain_pickle(reader) != LEGACY_PROTOCOL:
        raise BadContent("storage bytes that are not a torch.save blob (wrong magic number)")
    info = _plain_pickle(reader)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise BadContent("storage bytes saved on a big-endian machine or without sys_info")
    declared: dict[str, tuple[StorageType, int]] = {}

    def persistent(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                and _KEY.match(pid[2]) and type(pid[4]) is int and pid[4] >= 0 and pid[5] is None):
            raise BadContent("a storage record that is not ('storage', type, key, location, "
                             "size, None)")
        declared[pid[2]] = (pid[1], pid[4])
        return ("storage", pid[2])

    main = TensorPickleReader(reader, allowed={("torch", n): t for n, t in STORAGE_TYPES.items()},
                              refuse=refuse, byte_budget=0, persistent=persistent).load()
    keys = _plain_pickle(reader)
    if not (isinstance(main, tuple) and len(main) == 2 and main[0] == "storage"):
        raise BadContent("storage bytes that hold something other than one storage")
    if not isinstance(keys, list) or sorted(keys) != sorted(declared) or len(keys) != 1:
        raise BadContent("storage bytes whose key list does not match their one storage")
    storage_type, numel = declared[keys[0]]
    itemsize = storage_type.dtype.itemsize
    count = int.from_bytes(reader.read(8), "little", signed=True)
    if count != numel or numel * itemsize != reader.left:
        raise BadContent(f"a storage that declares {numel} elements of {itemsize} bytes but holds "
                         f"{reader.left} bytes")
    return _storage_from_bytes(reader.read(reader.left), storage_type.dtype)


def read_torch_zip(archive: zipfile.ZipFile, archive_bytes: int,
                   allowed: dict[tuple[str, str], Any],
                   refuse: Callable[[str, str], Exception]) -> Any:
    """The object in a ``torch.save`` zip archive: ``data.pkl`` read by TensorPickleReader,
    each storage exactly its member's bytes (its declared size checked against them)."""
    if sys.byteorder != "little":
        raise BadContent("a checkpoint on a big-endian machine, which traflow does not support")
    infos = archive.infolist()
    pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise BadContent("a zip archive without exactly one data.pkl (not a torch.save file)")
    prefix = pickles[0].filename[: -len("data.pkl")]
    for info in infos:
        if info.file_size > archive_bytes:
            raise BadContent(f"a zip member {info.filename!r} that claims {info.file_size} bytes, "
                             f"more than the whole {archive_bytes}-byte file (a zip bomb)")
    order = prefix + "byteorder"
    if order in archive.namelist() and archive.read(order).strip() != b"little":
        raise BadContent("a big-endian checkpoint, which traflow does not read")
    storages: dict[str, FileStorage] = {}
    data = archive.read(pickles[0])
    reader_box: list[TensorPickleReader] = []

    def persistent(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                and _KEY.match(pid[2]) and type(pid[4]) is int and pid[4] >= 0):
            raise BadContent("a storage record that is not ('storage', type, key, location, "
                             "size)")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key in storages:
            if storages[key].dtype != storage_type.dtype or storages[key].numel != numel:
                raise BadContent(f"storage {key!r} declared twice, differently")
            return storages[key]
        name = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise BadContent(f"a tensor whose storage {name!r} is not in the archive") from None
        expected = numel * storage_type.dtype.itemsize
        if info.file_size != expected:
            raise BadContent(f"storage {name!r} declared as {numel} elements ({expected} bytes) "
                             f"but {info.file_size} bytes long")
        payload = archive.read(info)
        if len(payload) != expected:
            raise BadContent(f"storage {name!r} that is truncated")
        storages[key] = reader_box[0].add_storage(_storage_from_bytes(payload, storage_type.dtype))
        return storages[key]

    reader = TensorPickleReader(BoundedReader(io.BytesIO(data), len(data)), allowed=allowed,
                                refuse=refuse, byte_budget=view_budget(archive_bytes),
                                persistent=persistent)
    reader_box.append(reader)
    obj = reader.load()
    reader.verify()
    return obj

"""PyTorch checkpoint files (``torch.save``) read into numpy, without PyTorch and without running their code.

A ``.pth`` file is a pickle, and unpickling runs whatever the file names. So the
pickle here is read by an unpickler that resolves only the names that tensors
and their containers need (the storage classes, ``torch._utils``'s tensor and
parameter rebuilders, ``collections.OrderedDict``); any other name stops the
read with :class:`UnsafePickleError`, before anything of it is called.

Both layouts ``torch.save`` writes are read:

* the zip archive (PyTorch >= 1.6; torchvision's and mmdetection 3's
  checkpoints): ``<folder>/data.pkl`` holds the pickle, ``<folder>/data/<key>``
  each storage's raw bytes, ``<folder>/byteorder`` their byte order;
* the legacy stream (mmdetection 2's published 2019-2020 checkpoints): the
  pickles of a magic number, the protocol version (1001) and the system info,
  then the object's pickle, then that of the list of storage keys, then for
  each key its element count (int64) and raw bytes.

In both, the pickle names each storage by a persistent id
``("storage", storage class, key, location, element count[, view])`` and each
tensor as ``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` (offset
and strides in elements). Tensors come back as numpy arrays: floating ones as
float32 (as ``tensor.float()``), others in their own dtype.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


class UnsafePickleError(ValueError):
  """The pickle names something other than tensors and plain containers."""


class _StorageType:
  """What a storage class name (``torch.FloatStorage``) resolves to: its element dtype."""

  def __init__(self, name: str):
    self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
  """A storage named in the pickle; ``array`` (1-D, ``numel`` elements) is filled in once its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.array: Optional[np.ndarray] = None

  def elements(self) -> np.ndarray:
    if self.array is None:
      raise ValueError("a storage named in the pickle has no data in the file")
    return self.array


class _StorageView:
  """A legacy storage that is a slice of another (``view_metadata``)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel

  def elements(self) -> np.ndarray:
    return self.root.elements()[self.offset:self.offset + self.numel]


class _Tensor:
  """A tensor of the pickle, a view into a storage, made an array by :func:`_materialize`."""

  def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise UnsafePickleError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.elements()
    if len(self.size) != len(self.stride) or any(n < 0 for n in self.size) or any(s < 0 for s in self.stride):
      raise ValueError(f"a tensor has size {self.size} and stride {self.stride}")
    if all(self.size):
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if self.offset < 0 or last >= flat.size:
        raise ValueError(f"a tensor of size {self.size} at offset {self.offset} reaches past its storage of "
                         f"{flat.size} elements")
      view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                             tuple(s * flat.itemsize for s in self.stride), writeable=False)
    else:
      view = np.zeros(self.size, flat.dtype)
    array = np.array(view)
    return array.astype(np.float32) if array.dtype in FLOAT_DTYPES else array


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> _Tensor:
  del requires_grad, backward_hooks, metadata  # training-time state: a state dict's arrays do not need it
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> _Tensor:
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise UnsafePickleError(f"a parameter is rebuilt from a {type(data).__name__}, not a tensor")
  return data


ALLOWED_CALLABLES: Dict[Tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only ``ALLOWED_CALLABLES`` and the storage classes; storages come from ``storage_for``."""

  def __init__(self, file: BinaryIO, storage_for: Callable[[tuple], Any], source: str):
    super().__init__(file)
    self._storage_for, self._source = storage_for, source

  def find_class(self, module: str, name: str):
    if (module, name) in ALLOWED_CALLABLES:
      return ALLOWED_CALLABLES[(module, name)]
    if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(f"{self._source}: its pickle names {module}.{name}, which is not a tensor or a plain "
                            f"container, so it was not loaded (nothing of it ran); a checkpoint of weights needs "
                            f"only tensors, numbers, strings, lists and dicts: save its state dict alone")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f"{self._source}: its pickle refers to {pid!r}, which is not a tensor storage")
    return self._storage_for(pid)


def _storage_from_bytes(data: bytes, dtype: np.dtype, numel: int, byteorder: str) -> np.ndarray:
  if len(data) != numel * dtype.itemsize:
    raise ValueError(f"a storage of {numel} {dtype} elements has {len(data)} bytes")
  array = np.frombuffer(data, dtype.newbyteorder("<" if byteorder == "little" else ">"))
  return array.astype(dtype.newbyteorder("="))


def _read_zip(file: BinaryIO, source: str) -> Any:
  with zipfile.ZipFile(file) as archive:
    pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"a PyTorch zip checkpoint holds one data.pkl; this one holds {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    storages: Dict[str, _Storage] = {}

    def storage_for(pid):
      _, kind, key, _, numel = pid[:5]
      if key not in storages:
        storage = _Storage(kind.dtype, int(numel))
        storage.array = _storage_from_bytes(archive.read(f"{prefix}data/{key}"), kind.dtype, int(numel), byteorder)
        storages[key] = storage
      return storages[key]

    return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storage_for, source).load()


def _read_legacy(file: BinaryIO, source: str) -> Any:
  def plain():
    return _RestrictedUnpickler(file, lambda pid: None, source).load()

  if plain() != LEGACY_MAGIC_NUMBER:
    raise ValueError("not a PyTorch checkpoint (no zip archive, no legacy magic number)")
  version = plain()
  if version != LEGACY_PROTOCOL_VERSION:
    raise ValueError(f"legacy PyTorch checkpoint protocol {version}; only {LEGACY_PROTOCOL_VERSION} is read")
  info = plain()
  byteorder = "little" if info.get("little_endian", True) else "big"
  storages: Dict[str, _Storage] = {}

  def storage_for(pid):
    _, kind, key, _, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    if key not in storages:
      storages[key] = _Storage(kind.dtype, int(numel))
    if view is None:
      return storages[key]
    _, offset, view_numel = view
    return _StorageView(storages[key], int(offset), int(view_numel))

  result = _RestrictedUnpickler(file, storage_for, source).load()
  for key in plain():
    storage = storages[str(key)]
    (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", file.read(8))
    storage.array = _storage_from_bytes(file.read(numel * storage.dtype.itemsize), storage.dtype, numel, byteorder)
  return result


def _materialize(value: Any) -> Any:
  """``value`` with every tensor made a numpy array, through dicts, lists and tuples."""
  if isinstance(value, _Tensor):
    return value.to_numpy()
  if isinstance(value, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v)) for k, v in value.items())
  if isinstance(value, dict):
    return {k: _materialize(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_materialize(v) for v in value)
  return value


def load(path) -> Any:
  """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays (see the module docstring).

  Raises:
    UnsafePickleError: the pickle names anything but tensors and plain containers.
    ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile: the file is damaged or not a checkpoint.
  """
  source = str(path)
  with open(path, "rb") as file:
    reader = _read_zip if zipfile.is_zipfile(file) else _read_legacy
    file.seek(0)
    return _materialize(reader(file, source))


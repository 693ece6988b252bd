"""PyTorch zip checkpoints (`torch.save`: `.bin`, `.pt`, `.pth`) without torch, and without
running the pickle's code.

A torch zip holds `<root>/data.pkl` (a pickle of the saved object whose tensors refer to storages
by key) and `<root>/data/<key>` (the raw bytes of each storage). The pickle is read by an unpickler
that resolves only an allow-list of globals (`collections.OrderedDict`, the tensor and parameter
rebuild functions, storage classes and dtypes) to harmless stand-ins defined here: any other
global (`os.system`, `builtins.eval`, ...) stops the read with an error before it can be called.
Tensors come back as `LazyTensor`s; a storage's bytes are memory-mapped only when a tensor is
loaded.

Bounds against hostile files: a view must fit in its storage and hold no more elements than the
storage (a stride-0 view of one float cannot stand for gigabytes); a compressed storage is
inflated only over the view's span; dict keys must be plain values (hashing a shared tuple can
cost 2**60); and turning the unpickled object into named tensors has a work budget proportional to
the pickle's size, since shared references can make a few hundred bytes stand for 2**60 objects.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ham_mlx.convert.tensors import DTYPES, ConversionError, LazyTensor

# torch storage classes (legacy typed storages) and dtypes -> safetensors dtype names.
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
}  # fmt: skip
TORCH_DTYPES = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16",
    "half": "F16", "bfloat16": "BF16", "int64": "I64", "long": "I64", "int32": "I32",
    "int": "I32", "int16": "I16", "short": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
# Storage classes and dtypes that exist in torch but that we cannot convert: they unpickle to a
# named placeholder, so that the error names the tensor and its dtype.
OTHER_STORAGES = (
    "ComplexDoubleStorage", "ComplexFloatStorage", "QInt8Storage", "QInt32Storage",
    "QUInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage", "UntypedStorage",
)  # fmt: skip
OTHER_DTYPES = (
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "complex32", "complex64", "complex128", "uint16", "uint32", "uint64",
    "qint8", "qint32", "quint8", "quint4x2", "quint2x4", "bits8", "bits16",
)  # fmt: skip
MAX_PICKLE_BYTES = 1024**3
# what reading a member of a corrupt archive raises (NotImplementedError: a zip version or a
# compression method that zipfile does not read)
UNREADABLE = (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError)
# A view of a compressed storage may span this many bytes more than it holds (it is inflated
# whole); a sparser one is refused.
SPARSE_SLACK = 1 << 20
# Work allowed to turn the unpickled object into named tensors (objects visited plus characters
# of the names built): a checkpoint without shared references needs less than its pickle's size.
WRAP_BUDGET_PER_BYTE, WRAP_BUDGET = 16, 10_000_000
# Types allowed as dict keys and set items: hashing them costs their own size (hashing a tuple
# hashes what it holds, and a pickle can share one tuple 2**60 times within a few hundred bytes).
FLAT_KEYS = (str, int, float, bool, bytes, type(None))
HINT = (
    "only tensors, dicts, lists and plain values can be read; save just the weights with "
    "torch.save(model.state_dict(), path) or as safetensors"
)


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for `torch.FloatStorage` etc.; `dtype` is a DTYPES key or torch's own name."""

    dtype: str


@dataclass(frozen=True, slots=True)
class DType:
    """Stand-in for a `torch.dtype` global."""

    dtype: str


@dataclass(frozen=True, slots=True)
class Storage:
    key: str
    dtype: str  # DTYPES key, "UNTYPED" (bytes; the tensor names the dtype), or torch's name
    numel: int


@dataclass
class TensorRef:
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage record")
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else ()
    if not ints or not all(type(x) is int for x in ints):
        raise pickle.UnpicklingError("a tensor whose offset, size or stride is not integers")
    return TensorRef(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    t = _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
    if not isinstance(dtype, DType):
        raise pickle.UnpicklingError(f"a tensor whose dtype is a {type(dtype).__name__}")
    t.dtype = dtype.dtype
    return t


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


def _ordered_dict(*args):
    if args:  # torch's pickles fill it by SETITEMS, where the keys are checked
        raise pickle.UnpicklingError("an OrderedDict built from arguments")
    return OrderedDict()


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", k): StorageType(v) for k, v in STORAGE_DTYPES.items()},
    **{("torch", k): StorageType("UNTYPED" if k == "UntypedStorage" else k)
       for k in OTHER_STORAGES},
    **{("torch", k): DType(v) for k, v in TORCH_DTYPES.items()},
    **{("torch", k): DType(f"torch.{k}") for k in OTHER_DTYPES},
}  # fmt: skip


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only ALLOWED globals; storages become `Storage` records (no bytes are read).

    The pure-Python unpickler, so that BUILD (setting an object's state) can be limited to the
    dicts that torch pickles state dicts as: it cannot touch the stand-ins or the functions.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, file: str):
        super().__init__(io.BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise ConversionError(
                f"{self.file}: refused: the pickle asks for the global '{module}.{name}', which "
                f"is not allowed ({HINT}); nothing in it was run"
            ) from None

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], OrderedDict):
            raise ConversionError(
                f"{self.file}: refused: the pickle sets the state of a "
                f"{type(self.stack[-2]).__name__} ({HINT}); nothing in it was run"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def check_keys(self, keys) -> None:
        bad = next((k for k in keys if not isinstance(k, FLAT_KEYS)
                    or (isinstance(k, int) and k.bit_length() > 64)), None)  # fmt: skip
        if bad is not None:
            raise ConversionError(
                f"{self.file}: refused: a dict key or set item that is a {type(bad).__name__} "
                f"({HINT})"
            )

    # After a MARK, self.stack holds just the marked items (pickle's pop_mark).
    def load_setitem(self) -> None:
        self.check_keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self) -> None:
        self.check_keys(self.stack[::2])
        super().load_setitems()

    def load_dict(self) -> None:
        self.check_keys(self.stack[::2])
        super().load_dict()

    def load_additems(self) -> None:
        self.check_keys(self.stack)
        super().load_additems()

    def load_frozenset(self) -> None:
        self.check_keys(self.stack)
        super().load_frozenset()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def persistent_load(self, pid: Any) -> Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], StorageType)
        ):
            raise ConversionError(f"{self.file}: refused: unknown persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(key, str) or type(numel) is not int:
            raise ConversionError(f"{self.file}: refused: a storage record whose key is not a "
                                  "string or whose size is not an integer")  # fmt: skip
        return Storage(key, kind.dtype, numel)


def read_torch_zip(path: str | Path) -> dict[str, Any]:
    """The object a torch zip checkpoint holds (dicts, lists, plain values), with every tensor as
    a `LazyTensor` named by its path in the object (`"state_dict.model.norm.weight"`)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith(b"PK"):
        if magic[:1] == b"\x80":
            raise ConversionError(
                f"{path}: a legacy (non-zip) torch file or a raw pickle; ham-mlx reads only the "
                "zip format that torch.save writes since torch 1.6 (re-save it with a current "
                "torch, or as safetensors); it was not unpickled"
            )
        raise ConversionError(f"{path}: not a torch zip checkpoint (starts with {magic!r})")
    try:
        zf = zipfile.ZipFile(path)
        infos = {i.filename: i for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        # NotImplementedError: a zip version or compression method zipfile does not read
        raise ConversionError(f"{path}: unreadable zip archive, truncated or corrupt? ({e})") from e
    if any(n.endswith("/constants.pkl") and n.count("/") == 1 for n in infos):
        raise ConversionError(f"{path}: a TorchScript archive, not a checkpoint of weights")
    pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise ConversionError(f"{path}: not a torch checkpoint (no single <root>/data.pkl)")
    root = pkl[0][: -len("data.pkl")]
    if infos[pkl[0]].file_size > MAX_PICKLE_BYTES:
        raise ConversionError(f"{path}: data.pkl is implausibly large")
    big_endian = False
    try:
        if root + "byteorder" in infos:
            with zf.open(root + "byteorder") as f:  # a few bytes, however large it claims to be
                big_endian = f.read(16).strip() == b"big"
        data = zf.read(pkl[0])
        obj = RestrictedUnpickler(data, str(path)).load()
    except ConversionError:
        raise
    except (*UNREADABLE, ValueError) as e:
        raise ConversionError(f"{path}: corrupt or truncated ({e})") from e
    except RecursionError:
        raise ConversionError(f"{path}: the pickle is nested too deeply") from None
    except Exception as e:  # any other failure inside the restricted pickle machine
        raise ConversionError(f"{path}: cannot read the pickle ({type(e).__name__}: {e})") from e
    reader = _StorageReader(path, zf, infos, root, big_endian)
    try:
        return _wrap(obj, reader, WRAP_BUDGET_PER_BYTE * len(data) + WRAP_BUDGET)
    except RecursionError:
        raise ConversionError(f"{path}: the saved object is nested too deeply") from None


class _StorageReader:
    def __init__(self, path: Path, zf: zipfile.ZipFile, infos: dict, root: str, big: bool):
        self.path, self.zf, self.infos, self.root, self.big = path, zf, infos, root, big
        self.size = path.stat().st_size

    def reader(self, ref: TensorRef, name: str):
        dtype = DTYPES[ref.dtype][0]
        if self.big:
            dtype = dtype.newbyteorder(">")
        member = f"{self.root}data/{ref.storage.key}"
        info = self.infos.get(member)
        where = f"{self.path}: tensor {name!r}"
        if info is None:
            raise ConversionError(f"{where}: its storage {member!r} is missing from the archive")
        nbytes = info.file_size
        numel = nbytes // dtype.itemsize
        dims = (*ref.shape, *ref.stride, ref.offset)
        if not all(type(x) is int for x in dims) or len(ref.shape) != len(ref.stride):
            raise ConversionError(
                f"{where}: shape {ref.shape}, stride {ref.stride} and offset {ref.offset!r} must "
                "be integers, one stride per dimension"
            )
        if any(s < 0 for s in ref.stride) or ref.offset < 0 or any(d < 0 for d in ref.shape):
            raise ConversionError(f"{where}: negative size, stride or offset")
        if any(d >= 2**31 for d in ref.shape):
            raise ConversionError(f"{where}: shape {ref.shape} has a dimension of 2**31 or more")
        size = math.prod(ref.shape)
        last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
        if size and last >= numel:
            raise ConversionError(
                f"{where}: the view (offset {ref.offset}, shape {ref.shape}, stride {ref.stride}) "
                f"reaches element {last} of a storage of {numel} (truncated?)"
            )
        if size > numel:
            raise ConversionError(
                f"{where}: shape {ref.shape} has {size} elements, more than its storage's "
                f"{numel} (a view that repeats elements, e.g. a stride of 0)"
            )
        data_start = None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            if len(local) == 30 and local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                data_start = info.header_offset + 30 + name_len + extra_len
        if data_start is not None and data_start + nbytes > self.size:
            raise ConversionError(f"{where}: storage {member!r} is truncated")
        span = last + 1 - ref.offset  # elements from the view's first to its last
        if data_start is None and size and span > size + SPARSE_SLACK // dtype.itemsize:
            raise ConversionError(
                f"{where}: a view that spans {span} elements of a compressed storage for {size} "
                "(only dense views of compressed storages are read; torch.save stores them "
                "uncompressed)"
            )

        def read() -> np.ndarray:
            if not size:
                return np.zeros(0, dtype=dtype)
            if data_start is not None:
                flat = np.memmap(self.path, dtype=dtype, mode="r", offset=data_start,
                                 shape=(last + 1,))  # fmt: skip
                flat = flat[ref.offset :]
            else:  # compressed: inflate the view's span only, skipping what comes before
                item = dtype.itemsize
                flat = np.frombuffer(self.inflate(member, ref.offset * item, span * item, where),
                                     dtype=dtype)  # fmt: skip
            view = np.lib.stride_tricks.as_strided(
                flat, shape=ref.shape,
                strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False,
            )  # fmt: skip
            out = np.ascontiguousarray(view).reshape(-1)
            return out.astype(out.dtype.newbyteorder("<")) if self.big else out

        return read

    def inflate(self, member: str, start: int, nbytes: int, where: str) -> bytes:
        """Bytes start .. start + nbytes of a compressed member, decompressing no further (the
        bytes before `start` are decompressed in chunks and dropped)."""
        try:
            with self.zf.open(member) as f:
                f.seek(start)
                data = f.read(nbytes)
        except UNREADABLE as e:
            raise ConversionError(f"{where}: cannot read storage {member!r} ({e})") from e
        if len(data) != nbytes:
            raise ConversionError(f"{where}: storage {member!r} is truncated")
        return data


def _wrap(obj: Any, reader: _StorageReader, budget: int) -> Any:
    """Replace TensorRefs by LazyTensors (named by their path). An object that the pickle shares
    is visited once per reference, so the work (objects visited plus name characters built) is
    capped at `budget`: a few hundred bytes of memo references could otherwise stand for 2**60."""
    left = budget

    def wrap(obj: Any, name: str) -> Any:
        nonlocal left
        left -= 1 + len(name)
        if left < 0:
            raise ConversionError(
                f"{reader.path}: the pickle's shared references expand to more than {budget} "
                "objects and name characters; not a plain checkpoint"
            )
        if isinstance(obj, TensorRef):
            dtype = obj.dtype
            t = LazyTensor(str(reader.path), name, dtype, obj.shape, read=lambda: None)  # type: ignore[arg-type]
            if dtype in DTYPES:
                t.read = reader.reader(obj, name)
            return t
        if isinstance(obj, dict):
            return {k: wrap(v, f"{name}.{k}" if name else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(wrap(v, f"{name}.{i}" if name else str(i))
                             for i, v in enumerate(obj))  # fmt: skip
        if isinstance(obj, (Storage, StorageType, DType)):
            raise ConversionError(f"{reader.path}: {name!r} is a bare storage or dtype, not a "
                                  "tensor")  # fmt: skip
        return obj

    return wrap(obj, "")

"""PyTorch zip checkpoints (`torch.save`: `.bin`, `.pt`, `.pth`) without torch, and without
running the pickle's code.

A torch zip holds `<root>/data.pkl` (a pickle of the saved object whose tensors refer to storages
by key) and `<root>/data/<key>` (the raw bytes of each storage). The pickle is read by an unpickler
that resolves only an allow-list of globals (`collections.OrderedDict`, the tensor and parameter
rebuild functions, storage classes and dtypes) to harmless stand-ins defined here: any other
global (`os.system`, `builtins.eval`, ...) stops the read with an error before it can be called.
Tensors come back as `LazyTensor`s; a storage's bytes are memory-mapped only when a tensor is
loaded.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
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
    return TensorRef(storage, int(offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    t = _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
    t.dtype = dtype.dtype if isinstance(dtype, DType) else str(dtype)
    return t


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
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

    def persistent_load(self, pid: Any) -> Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], StorageType)
        ):
            raise ConversionError(f"{self.file}: refused: unknown persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        return Storage(str(key), kind.dtype, int(numel))


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
    except (zipfile.BadZipFile, OSError, ValueError) as e:
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
    if root + "byteorder" in infos:
        big_endian = zf.read(root + "byteorder").strip() == b"big"
    try:
        obj = RestrictedUnpickler(zf.read(pkl[0]), str(path)).load()
    except ConversionError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt or truncated ({e})") from e
    except RecursionError:
        raise ConversionError(f"{path}: the pickle is nested too deeply") from None
    except Exception as e:  # any other failure inside the restricted pickle machine
        raise ConversionError(f"{path}: cannot read the pickle ({type(e).__name__}: {e})") from e
    reader = _StorageReader(path, zf, infos, root, big_endian)
    try:
        return _wrap(obj, "", reader)
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
        if any(s < 0 for s in ref.stride) or ref.offset < 0 or any(d < 0 for d in ref.shape):
            raise ConversionError(f"{where}: negative size, stride or offset")
        last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
        if all(ref.shape) and last >= numel:
            raise ConversionError(
                f"{where}: the view (offset {ref.offset}, shape {ref.shape}, stride {ref.stride}) "
                f"reaches element {last} of a storage of {numel} (truncated?)"
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

        def read() -> np.ndarray:
            if not all(ref.shape):
                return np.zeros(0, dtype=dtype)
            if data_start is not None:
                flat = np.memmap(self.path, dtype=dtype, mode="r", offset=data_start,
                                 shape=(numel,))  # fmt: skip
            else:
                try:
                    flat = np.frombuffer(self.zf.read(member), dtype=dtype, count=numel)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise ConversionError(f"{where}: cannot read storage {member!r} ({e})") from e
            view = np.lib.stride_tricks.as_strided(
                flat[ref.offset :], shape=ref.shape,
                strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False,
            )  # fmt: skip
            out = np.ascontiguousarray(view).reshape(-1)
            return out.astype(out.dtype.newbyteorder("<")) if self.big else out

        return read


def _wrap(obj: Any, name: str, reader: _StorageReader) -> Any:
    """Replace TensorRefs by LazyTensors (named by their path), recursively."""
    if isinstance(obj, TensorRef):
        dtype = obj.dtype
        t = LazyTensor(str(reader.path), name, dtype, obj.shape, read=lambda: None)  # type: ignore[arg-type]
        if dtype in DTYPES:
            t.read = reader.reader(obj, name)
        return t
    if isinstance(obj, dict):
        return {k: _wrap(v, f"{name}.{k}" if name else str(k), reader) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(v, f"{name}.{i}" if name else str(i), reader)
                         for i, v in enumerate(obj))  # fmt: skip
    if isinstance(obj, (Storage, StorageType, DType)):
        raise ConversionError(f"{reader.path}: {name!r} is a bare storage or dtype, not a tensor")
    return obj

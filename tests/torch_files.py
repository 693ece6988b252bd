"""Write torch-format checkpoint files without torch (for the reader tests).

`fake_torch_save(obj, path)` writes the zip layout of `torch.save`: `<root>/data.pkl` and
`<root>/data/<key>`. In `obj`, a `Tensor` stands for a torch tensor (a view of a numpy storage:
offset, shape, stride in elements); `Parameter(t)` for an nn.Parameter. The pickle names the
same globals torch's does (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...); with
torch installed the tests check that torch.load reads these files the same way.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

STORAGES = {
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}  # fmt: skip


@dataclass
class Tensor:
    storage: np.ndarray  # flat; uint16 holds bfloat16 bits when storage_type is BFloat16Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_type: str | None = None  # default from the numpy dtype

    @classmethod
    def of(cls, a: np.ndarray, storage_type: str | None = None) -> Tensor:
        a = np.array(a, order="C")
        stride = tuple(s // a.itemsize for s in a.strides)
        return cls(a.reshape(-1), 0, a.shape, stride, storage_type)


@dataclass
class Parameter:
    data: Tensor


# Stand-ins pickled by reference; their global names are rewritten to torch's below.
def _rebuild_tensor_v2(*args):  # pragma: no cover - never called
    raise AssertionError


def _rebuild_parameter(*args):  # pragma: no cover
    raise AssertionError


STORAGE_CLASSES = {
    name: type(name, (), {"__module__": __name__})
    for name in [*STORAGES.values(), "BFloat16Storage", "QInt8Storage", "Float8Storage"]
}
globals().update(STORAGE_CLASSES)


class _Pickler(pickle.Pickler):
    def __init__(self, f, storages: dict[int, tuple[str, np.ndarray]]):
        super().__init__(f, protocol=2)
        self.storages = storages

    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):
            key = self.storages.setdefault(id(obj.array), (str(len(self.storages)), obj.array))[0]
            return ("storage", STORAGE_CLASSES[obj.kind], key, "cpu", obj.array.size)
        return None

    def reducer_override(self, obj: Any):
        if isinstance(obj, Tensor):
            kind = obj.storage_type or STORAGES[obj.storage.dtype]
            args = (_StorageRef(obj.storage, kind), obj.offset, tuple(obj.shape),
                    tuple(obj.stride), False, OrderedDict())  # fmt: skip
            return _rebuild_tensor_v2, args
        if isinstance(obj, Parameter):
            return _rebuild_parameter, (obj.data, True, OrderedDict())
        return NotImplemented


@dataclass
class _StorageRef:
    array: np.ndarray
    kind: str


def torch_pickle(obj: Any) -> tuple[bytes, dict[int, tuple[str, np.ndarray]]]:
    storages: dict[int, tuple[str, np.ndarray]] = {}
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    data = buf.getvalue()
    mod = re.escape(__name__.encode())
    data = re.sub(rb"c" + mod + rb"\n(_rebuild_\w+)\n", rb"ctorch._utils\n\1\n", data)
    data = re.sub(rb"c" + mod + rb"\n(\w+Storage)\n", rb"ctorch\n\1\n", data)
    assert __name__.encode() not in data
    return data, storages


def write_torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
                    root: str = "archive", byteorder: str = "little") -> None:  # fmt: skip
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", data_pkl)
        z.writestr(f"{root}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            z.writestr(f"{root}/data/{key}", raw)
        z.writestr(f"{root}/version", "3\n")


def fake_torch_save(obj: Any, path, byteorder: str = "little") -> None:
    data, storages = torch_pickle(obj)
    order = ">" if byteorder == "big" else "<"
    raw = {key: a.astype(a.dtype.newbyteorder(order)).tobytes() for key, a in storages.values()}
    write_torch_zip(path, data, raw, byteorder=byteorder)

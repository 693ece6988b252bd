"""A small ONNX graph builder: `g.MatMul(a, b)` appends a node and returns its output's name.

Values are names (str). The builder tracks each value's element type so that `g.cast` is a no-op
when nothing changes, names nodes after the module path they lower (`/model/layers.0/attn/...`),
and keeps parameters as initializers named after the MLX parameter they come from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 24
IR_VERSION = 11  # the IR version that goes with opset 24 (onnx 1.19+)

FLOAT, FLOAT16, INT64, BOOL = (
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.INT64,
    TensorProto.BOOL,
)
NP_TYPES = {FLOAT: np.float32, FLOAT16: np.float16, INT64: np.int64, BOOL: np.bool_}

# Output element types of ops whose output type is not their first input's.
_FIXED_TYPES = {
    "Shape": INT64,
    "Size": INT64,
    "ArgMax": INT64,
    "ArgMin": INT64,
    "NonZero": INT64,
    "Equal": BOOL,
    "Less": BOOL,
    "Greater": BOOL,
    "LessOrEqual": BOOL,
    "GreaterOrEqual": BOOL,
    "Not": BOOL,
    "And": BOOL,
    "Or": BOOL,
    "Xor": BOOL,
    "IsNaN": BOOL,
    "IsInf": BOOL,
}


def onnx_type(dtype: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name that the subgraphs of node (Scan/Loop/If bodies) read or make."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for n in g.node:
                names.update(n.input)
                names.update(n.output)
                names |= _subgraph_names(n)
    return names


class Graph:
    """One ONNX graph (the model, or a `Scan` body that shares the parent's name counter)."""

    def __init__(self, name: str, dtype: Any = np.float32, parent: Graph | None = None):
        self.name = name
        self.dtype = onnx_type(dtype)  # the compute dtype of activations (FLOAT or FLOAT16)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.types: dict[str, int] = {} if parent is None else parent.types
        self._root = self if parent is None else parent._root
        self._scopes: list[str] = [] if parent is None else list(parent._scopes)
        self._counter = self._root.__dict__.setdefault("_counter", {})

    # ---- naming -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nodes and values made inside are named `/<outer>/<name>/...`."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def fresh(self, base: str) -> str:
        prefix = "/" + "/".join(self._scopes) + "/" if self._scopes else "/"
        name = prefix + base
        n = self._counter.get(name, 0)
        self._counter[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    # ---- values -------------------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: Sequence[int | str | None] | None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        self.types[name] = elem
        return name

    def output(self, value: str, name: str, elem: int, shape: Sequence[int | str | None] | None):
        """Declare graph output `name`: `value` renamed to it when a node of this graph makes it
        (so that e.g. a TensorScatter writes straight into an output bound to its input's buffer:
        onnxruntime updates a cache in place only then), else an Identity of `value`."""
        if value != name:
            if self._rename(value, name):
                self.types[name] = self.types.pop(value, elem)
            else:
                node = helper.make_node("Identity", [value], [name], name=self.fresh(name))
                self.nodes.append(node)
                self.types[name] = self.types.get(value, elem)
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def _rename(self, old: str, new: str) -> bool:
        """Rename the value `old`, made by one of this graph's nodes, to `new` everywhere it is
        used; False (nothing changed) when no node makes it, or a subgraph reads it."""
        made_by = [n for n in self.nodes if old in n.output]
        if not made_by or any(old in _subgraph_names(n) for n in self.nodes):
            return False
        for n in self.nodes:
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]
        return True

    def initializer(self, name: str, array: np.ndarray) -> str:
        if name in self.initializers:
            raise ValueError(f"initializer {name!r} defined twice")
        self.initializers[name] = numpy_helper.from_array(np.array(array, order="C"), name)
        self.types[name] = onnx_type(array.dtype)
        return name

    def const(self, value: Any, dtype: Any = None, name: str | None = None) -> str:
        """A constant initializer; floats default to the compute dtype."""
        if dtype is None:
            arr = np.asarray(value)
            dtype = NP_TYPES[self.dtype] if arr.dtype.kind == "f" else arr.dtype
        arr = np.asarray(value, dtype=dtype)
        return self._root.initializer(name or self.fresh("const"), arr)

    @property
    def const_dtype(self) -> type:
        """numpy dtype of the compute dtype."""
        return NP_TYPES[self.dtype]

    def i64(self, value: Any) -> str:
        return self.const(value, np.int64)

    def f32(self, value: Any) -> str:
        return self.const(value, np.float32)

    # ---- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, n_out: int = 1, out_types=None, **attrs):
        name = self.fresh(op_type)
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        ins = ["" if i is None else i for i in inputs]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, ins, outs, name=name, **attrs))
        for i, o in enumerate(outs):
            if out_types is not None:
                self.types[o] = out_types[i]
            elif op_type == "Cast":
                self.types[o] = attrs["to"]
            elif op_type in _FIXED_TYPES:
                self.types[o] = _FIXED_TYPES[op_type]
            elif op_type == "Where":
                self.types[o] = self.types.get(ins[1], self.dtype)
            elif ins and ins[0]:
                self.types[o] = self.types.get(ins[0], self.dtype)
        return outs[0] if n_out == 1 else tuple(outs)

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def cast(self, x: str, elem: int) -> str:
        """Cast x to elem (FLOAT, FLOAT16, ...) unless it already has that type."""
        return x if self.types.get(x) == elem else self.op("Cast", x, to=elem)

    def to_f32(self, x: str) -> str:
        return self.cast(x, FLOAT)

    def to_compute(self, x: str) -> str:
        return self.cast(x, self.dtype)

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 tensor of shape [1]."""
        return self.Shape(x, start=axis, end=axis + 1 if axis != -1 else None)

    def subgraph(self, name: str) -> Graph:
        return Graph(name, NP_TYPES[self.dtype], parent=self)

    def make_graph(self) -> onnx.GraphProto:
        inits = list(self.initializers.values()) if self is self._root else []
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)

    def make_model(self, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        model = helper.make_model(
            self.make_graph(),
            opset_imports=[helper.make_opsetid("", OPSET)],
            doc_string=doc,
            producer_name="ham_mlx.export",
        )
        model.ir_version = IR_VERSION
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        return model

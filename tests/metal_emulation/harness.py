"""Run the exact Metal source MLX generates for a `mx.fast.metal_kernel` on a Linux CPU.

    sources = capture_metal_source(fn, *arrays)  # fn calls the kernel with stream=mx.gpu,
                                                 # verbose=True; MLX prints the source on export
    outs, counters = run_kernel(sources[0], inputs={"a": a, "n": 3},
                                outputs={"out": (a.shape, np.float32)},
                                grid=(8, 1, 1), threadgroup=(8, 1, 1))

`run_kernel` compiles prelude.h + the source (Metal decorations stripped) + a generated main() with
`g++ -std=c++20 -O1 -pthread`, caches the binary by a hash of its source, and runs it: threadgroups
one after another, the threads of a threadgroup as concurrent OS threads (see prelude.h for what
is and is not emulated). It checks kernel logic and indexing, not Metal compilation or speed.

Buffers: inputs are copied row-contiguous (as `ensure_row_contiguous=True`); `x_shape`,
`x_strides` (in elements) and `x_ndim` parameters are filled from input `x`. bfloat16 buffers take
uint16 bit patterns, float arrays (rounded to nearest even) or ml_dtypes bfloat16 arrays; a
bfloat16 output comes back as float32 values, or as uint16 bits if its dtype is np.uint16. Outputs
start as 0xFF bytes (NaN for floats) unless `init_value` is given, so unwritten entries show up.
"""

from __future__ import annotations

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

PRELUDE = Path(__file__).with_name("prelude.h")
CXX_FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
CACHE_DIR = Path(os.environ.get("HAM_METAL_EMULATION_CACHE", "")
                 or Path(tempfile.gettempdir()) / "ham_metal_emulation")  # fmt: skip
MAX_THREADS_PER_THREADGROUP = 1024

# The attributes MLX adds to the signature when their name occurs in the body (and their types).
ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint", "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3", "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}  # fmt: skip

# Element types as they appear in generated signatures -> numpy storage dtype.
STORAGE = {
    "float": np.float32, "half": np.float16, "float16_t": np.float16, "bfloat16_t": np.uint16,
    "bool": np.bool_, "char": np.int8, "int8_t": np.int8, "uchar": np.uint8, "uint8_t": np.uint8,
    "short": np.int16, "int16_t": np.int16, "ushort": np.uint16, "uint16_t": np.uint16,
    "int": np.int32, "int32_t": np.int32, "uint": np.uint32, "uint32_t": np.uint32,
    "long": np.int64, "int64_t": np.int64, "ulong": np.uint64, "uint64_t": np.uint64,
    "size_t": np.uint64,
}  # fmt: skip


class MetalEmulationError(RuntimeError):
    """The kernel did not compile, crashed, timed out, or was called with the wrong buffers."""


@dataclass(frozen=True)
class Param:
    """One parameter of the generated kernel signature."""

    name: str
    type: str  # element or value type: "float", "bfloat16_t", "atomic<float>", "uint3"
    address_space: str | None  # "device" or "constant"; None for attributes
    pointer: bool  # `T* name` (else a value or `const constant T&`)
    const: bool
    buffer: int | None  # [[buffer(i)]]
    attribute: str | None  # e.g. "thread_position_in_grid"

    @property
    def is_output(self) -> bool:
        return self.address_space == "device" and self.pointer and not self.const

    @property
    def element_type(self) -> str:
        m = re.fullmatch(r"atomic<\s*(\w+)\s*>", self.type)
        return m.group(1) if m else self.type


@dataclass(frozen=True)
class KernelSource:
    """One kernel as MLX printed it, and its parsed signature."""

    name: str  # the name given to metal_kernel
    source: str  # the printed source, verbatim (header + kernel + instantiation)
    function: str  # e.g. "custom_kernel_myk__float_4_float_int32_ts_float"
    template_params: tuple[str, ...]  # e.g. ("T", "N")
    template_args: tuple[str, ...]  # e.g. ("float", "4")
    params: tuple[Param, ...]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"kernel `{self.name}` has no parameter {name!r}")


# ----------------------------------------------------------------------------------------------
# Capturing and parsing the generated source

_BLOCK = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```", re.S)
_KERNEL = re.compile(r"\[\[kernel\]\]\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
_TEMPLATE = re.compile(r"template\s*<([^>]*)>\s*$")
_INSTANCE = re.compile(r"^template\s+\[\[host_name\(\"\w+\"\)\]\].*?decltype\(\w+<(.*)>\)", re.M)
_PARAM = re.compile(
    r"(?P<const>const\s+)?(?:(?P<space>device|constant)\s+)?(?P<type>[\w:]+(?:\s*<[^>]*>)?)"
    r"\s*(?P<ref>[*&]?)\s*(?P<name>\w+)\s*\[\[\s*(?P<attr>\w+)(?:\((?P<index>\d+)\))?\s*\]\]"
)


def _split_top(text: str) -> list[str]:
    """Split on commas outside <> and ()."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_param(text: str) -> Param:
    m = _PARAM.fullmatch(" ".join(text.split()))
    if m is None:
        raise MetalEmulationError(f"cannot parse kernel parameter: {text!r}")
    attr = m["attr"]
    if attr == "buffer":
        return Param(m["name"], m["type"], m["space"], m["ref"] == "*", bool(m["const"]),
                     int(m["index"]), None)  # fmt: skip
    if attr not in ATTRIBUTES:
        raise MetalEmulationError(f"unknown kernel attribute [[{attr}]] on {m['name']}")
    return Param(m["name"], m["type"], None, False, bool(m["const"]), None, attr)


def parse_metal_source(text: str) -> list[KernelSource]:
    """Every kernel in MLX's verbose output (identical sources once, in order of appearance)."""
    kernels, seen = [], set()
    for name, source in _BLOCK.findall(text):
        if source in seen:
            continue
        seen.add(source)
        m = _KERNEL.search(source)
        if m is None:
            raise MetalEmulationError(f"no [[kernel]] function in the source of `{name}`")
        t = _TEMPLATE.search(source[: m.start()].rstrip())
        params = tuple(t[1].split(",")) if t else ()
        inst = _INSTANCE.search(source)
        kernels.append(KernelSource(
            name=name, source=source, function=m[1],
            template_params=tuple(p.split()[-1] for p in params),
            template_args=tuple(_split_top(inst[1])) if inst else (),
            params=tuple(_parse_param(p) for p in _split_top(m[2])),
        ))  # fmt: skip
    return kernels


def capture_metal_source(fn: Callable, *arrays: mx.array) -> list[KernelSource]:
    """The kernels `fn(*arrays)` calls, from `mx.export_function` with stdout captured at the fd
    level (MLX prints from C++). `fn` must call its kernels with `stream=mx.gpu, verbose=True`."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryDirectory(prefix="ham_metal_capture_") as tmp:
        log = Path(tmp) / "stdout.txt"
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        try:
            with open(log, "wb") as f:
                os.dup2(f.fileno(), 1)
                mx.export_function(str(Path(tmp) / "fn.mlxfn"), fn, *arrays)
        finally:
            sys.stdout.flush()
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        text = log.read_text()
    kernels = parse_metal_source(text)
    if not kernels:
        raise MetalEmulationError(
            "MLX printed no kernel source: call the kernel with stream=mx.gpu, verbose=True"
        )
    return kernels


def kernel_source(kernel, *, inputs: list, **call_kwargs) -> KernelSource:
    """The source of one `kernel(inputs=inputs, **call_kwargs)` call (template, grid,
    threadgroup, output_shapes, output_dtypes as for the real call; the source depends on the
    dtypes and template values only)."""
    arrays = [x for x in inputs if isinstance(x, mx.array)]

    def fn(*args):
        it = iter(args)
        ins = [next(it) if isinstance(x, mx.array) else x for x in inputs]
        return kernel(inputs=ins, **call_kwargs, stream=mx.gpu, verbose=True)

    (src,) = capture_metal_source(fn, *arrays)
    return src


# ----------------------------------------------------------------------------------------------
# Building the C++ program

_STRIP = re.compile(
    r"\[\[\s*(?:kernel|host_name\([^)]*\)|buffer\(\d+\)|threadgroup\(\d+\)|"
    + "|".join(ATTRIBUTES) + r")\s*\]\]"
)  # fmt: skip
# `threadgroup T* p` / `threadgroup T& r`: a pointer into threadgroup memory is a plain pointer.
_TG_POINTER = re.compile(
    r"\bthreadgroup\s+(?=(?:const\s+)?[\w:]+(?:<[^;{}()]*>)?\s*(?:const\s*)?[*&])"
)


def cpp_source(src: KernelSource) -> str:
    """The C++ file run_kernel compiles: prelude, stripped kernel source, main()."""
    body = re.sub(r"^template\s+\[\[host_name.*$", "", src.source, flags=re.M)
    body = re.sub(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>", r"// \g<0>", body, flags=re.M)
    body = _TG_POINTER.sub("", _STRIP.sub("", body))
    args = []
    for p in src.params:
        if p.attribute:
            args.append(f"t.{p.attribute}")
        elif p.pointer:
            args.append(f"({'const ' if p.const else ''}{p.type}*)bufs[{p.buffer}]")
        else:
            args.append(f"*(const {p.type}*)bufs[{p.buffer}]")
    call = src.function + (f"<{', '.join(src.template_args)}>" if src.template_params else "")
    n_buffers = 1 + max((p.buffer for p in src.params if p.buffer is not None), default=-1)
    writes = "".join(f"  bufs.write({p.buffer});\n" for p in src.params if p.is_output)
    head = f'#include "prelude.h"\n#line 1 "{src.name}.metal"\n{body}\n'
    return (
        head
        + f"""#line {head.count(chr(10)) + 2} "kernel.cpp"
#undef device
#undef constant
#undef thread
#undef threadgroup
int main(int argc, char** argv) {{
  if (argc != 8) return 2;
  ham::Buffers bufs(argv[1], {n_buffers});
  auto dim = [&](int i) {{ return uint(std::strtoul(argv[i], nullptr, 10)); }};
  const uint3 grid{{dim(2), dim(3), dim(4)}}, tg{{dim(5), dim(6), dim(7)}};
  ham::dispatch(grid, tg, [&](const ham::ThreadIds& t) {{
    {call}(
        {", ".join(args)});
  }});
{writes}  ham::write_counters(std::string(argv[1]) + "/counters.txt");
  return 0;
}}
"""
    )


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def _compile(src: KernelSource, sanitize: bool) -> Path:
    cpp = cpp_source(src)
    flags = CXX_FLAGS + (SANITIZE_FLAGS if sanitize else [])
    key = hashlib.sha256("\0".join([PRELUDE.read_text(), cpp, *flags]).encode()).hexdigest()
    folder = CACHE_DIR / f"{src.name}-{key[:16]}"
    exe = folder / "kernel"
    if exe.exists():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.cpp").write_text(cpp)
    tmp = folder / f"kernel.{os.getpid()}.tmp"
    cmd = ["g++", *flags, "-I", str(PRELUDE.parent), "kernel.cpp", "-o", str(tmp)]
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if r.returncode != 0:
        raise MetalEmulationError(
            f"g++ could not compile kernel `{src.name}` ({folder / 'kernel.cpp'}; "
            f"`{src.name}.metal` lines are lines of the printed source):\n{r.stderr}"
        )
    os.replace(tmp, exe)
    return exe


# ----------------------------------------------------------------------------------------------
# Buffers


def to_bfloat16_bits(x) -> np.ndarray:
    """float values -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def from_bfloat16_bits(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _storage(p: Param) -> np.dtype:
    try:
        return np.dtype(STORAGE[p.element_type])
    except KeyError:
        raise MetalEmulationError(f"unsupported element type {p.type!r} of {p.name}") from None


def _input_buffer(value, p: Param) -> np.ndarray:
    a = np.asarray(value)
    if p.element_type == "bfloat16_t":
        if a.dtype == np.uint16:
            return np.ascontiguousarray(a)
        if a.dtype.name == "bfloat16":  # ml_dtypes
            return np.ascontiguousarray(a).view(np.uint16)
        if a.dtype.kind in "fiub":
            return to_bfloat16_bits(a)
    dtype = _storage(p)
    if a.dtype != dtype and not np.can_cast(a.dtype, dtype, "same_kind"):
        raise MetalEmulationError(f"input {p.name}: cannot pass {a.dtype} as {p.type}")
    return np.ascontiguousarray(a, dtype=dtype)


def _companion(name: str, inputs: dict) -> np.ndarray | None:
    """x_shape / x_strides / x_ndim from input x (row-contiguous layout)."""
    m = re.fullmatch(r"(\w+)_(shape|strides|ndim)", name)
    if m is None or m[1] not in inputs:
        return None
    shape = np.shape(inputs[m[1]])
    if m[2] == "shape":
        return np.array(shape, dtype=np.int32)
    if m[2] == "ndim":
        return np.array(len(shape), dtype=np.int32)
    strides = np.cumprod((1,) + shape[:0:-1])[::-1] if shape else np.zeros(0)
    return np.array(strides, dtype=np.int64)


def _buffers(src: KernelSource, inputs: dict, outputs: dict, init_value) -> dict[int, np.ndarray]:
    names = {p.name for p in src.params if p.buffer is not None}
    stray = sorted(set(inputs) - names) + sorted(set(outputs) - names)
    if stray:
        raise MetalEmulationError(
            f"kernel `{src.name}` has no buffers {stray}; it has {sorted(names)}"
        )
    bufs = {}
    for p in src.params:
        if p.buffer is None:
            continue
        if p.is_output:
            if p.name not in outputs:
                raise MetalEmulationError(f"kernel `{src.name}`: output {p.name} needs a shape")
            shape, _ = outputs[p.name]
            a = np.empty(shape, dtype=_storage(p))
            if init_value is None:
                a.view(np.uint8).fill(0xFF)
            elif p.element_type == "bfloat16_t":
                a[...] = to_bfloat16_bits(init_value)
            else:
                a[...] = init_value
        elif p.name in inputs:
            a = _input_buffer(inputs[p.name], p)
        elif (a := _companion(p.name, inputs)) is None:
            raise MetalEmulationError(f"kernel `{src.name}`: no value for input {p.name}")
        if not p.pointer and a.size != 1:
            raise MetalEmulationError(f"input {p.name} is a scalar; got shape {a.shape}")
        bufs[p.buffer] = a
    return bufs


def _output_value(raw: np.ndarray, p: Param, dtype) -> np.ndarray:
    want = np.dtype(dtype)
    if p.element_type == "bfloat16_t" and want.kind == "f":
        return from_bfloat16_bits(raw).astype(want)
    if want != raw.dtype:
        raise MetalEmulationError(f"output {p.name} is {p.type} ({raw.dtype}); asked for {want}")
    return raw


# ----------------------------------------------------------------------------------------------
# Running


def run_kernel(
    src: KernelSource,
    inputs: dict[str, np.ndarray | int | float],
    outputs: dict[str, tuple[tuple[int, ...], np.dtype]],
    grid: tuple[int, int, int],
    threadgroup: tuple[int, int, int],
    init_value: float | None = None,
    timeout: float = 120.0,
    sanitize: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Run `src` on the CPU as MLX would dispatch it (`grid` counts threads). Returns the outputs
    and the HAM_COUNT counters (0 for a counter in the source that never fired). `sanitize`
    builds with AddressSanitizer/UBSan, so out-of-bounds reads of buffers fail loudly."""
    grid, tg = tuple(int(g) for g in grid), tuple(int(t) for t in threadgroup)
    if len(grid) != 3 or len(tg) != 3 or min(tg) < 1 or min(grid) < 0:
        raise ValueError(f"grid and threadgroup are (x, y, z); got {grid}, {tg}")
    if tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"threadgroup {tg} has more than {MAX_THREADS_PER_THREADGROUP} threads")
    bufs = _buffers(src, inputs, outputs, init_value)
    for p in src.params:
        if p.is_output:
            _output_value(np.empty(0, _storage(p)), p, outputs[p.name][1])  # check dtypes early
    exe = _compile(src, sanitize)
    with tempfile.TemporaryDirectory(prefix="ham_metal_run_") as run:
        for i, a in bufs.items():
            a.tofile(Path(run) / f"b{i}.bin")
        cmd = [str(exe), run, *map(str, grid), *map(str, tg)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MetalEmulationError(
                f"kernel `{src.name}` still running after {timeout:.0f} s: a threadgroup_barrier "
                "or SIMD op that not every thread of the threadgroup/simdgroup reaches?"
            ) from None
        if r.returncode != 0:
            why = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else "exit"
            raise MetalEmulationError(
                f"kernel `{src.name}` failed ({why}, code {r.returncode}); an out-of-bounds access "
                f"shows up with sanitize=True.\n{r.stderr[-4000:]}"
            )
        result = {}
        for p in src.params:
            if p.is_output:
                raw = np.fromfile(Path(run) / f"b{p.buffer}.bin", dtype=_storage(p))
                shape, dtype = outputs[p.name]
                result[p.name] = _output_value(raw.reshape(shape), p, dtype)
        code = re.sub(r"^\s*#.*$", "", src.source, flags=re.M)  # not `#define HAM_COUNT(name)`
        counters = dict.fromkeys(re.findall(r"\bHAM_COUNT\(\s*(\w+)\s*\)", code), 0)
        for line in (Path(run) / "counters.txt").read_text().splitlines():
            name, value = line.rsplit(" ", 1)
            counters[name] = int(value)
    return result, counters

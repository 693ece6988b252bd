"""MLX operations for the scan step and the HAM part of a one-token decode step on the CPU.

MLX runs the scan step (a product with the state, then the state's update in a strided kernel)
as about ten graph nodes, and the HAM part of the step (the head score, admission, the four
scatters into the KV buffer, the attention over the stored entries and the gated norm) as about
sixty; on the CPU each node costs several microseconds however small its work.
`ham_mlx/_mlx_ext.cpp` defines them as MLX primitives (`gdn_step`, and `head_score`, `ham_admit`,
four `write_slot`, `ham_attend`), so that they stay inside the compiled step (no host sync), read
the state once, write the buffers in place and share the work among threads (the gemv helper's
pool where it is loaded). One more serves prefill: `swiglu`, the MLP's SiLU(gate) * up on
several threads (MLX's compiled elementwise code runs on one).

The extension is compiled on first use against the installed MLX (its headers and `libmlx` ship
in the wheel) with nanobind's sources, by the C++ compiler MLX's own CPU `mx.compile` uses, and
kept in a cache folder keyed by the versions and the source, so a new MLX gets a new build. Where
anything is missing (no compiler, no nanobind, another nanobind ABI than MLX's, a platform other
than Linux) `available()` is false and the decode step keeps its MLX operations, which are this
operation's twin (tests/test_mlx_ext.py compares them). HAM_MLX_NO_MLX_EXT=1 turns it off;
HAM_MLX_EXT_DIR chooses the cache folder; HAM_MLX_EXT_THREADS the threads of one call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from ham_mlx.lanes import cpu_count

SOURCE = Path(__file__).resolve().parent.parent / "_mlx_ext.cpp"
# what SOURCE includes from the package
HEADERS = [SOURCE.parent / n for n in ("_surprise.h", "_exp2.h", "_ftz.h")]
# -march=native: the build serves this machine only (its CPU is part of the cache key);
# NB_DOMAIN=mlx: share nanobind's type registry with mlx.core, whose arrays the operations take
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
         "-DNB_DOMAIN=mlx"]  # fmt: skip
_log = logging.getLogger("ham_mlx")
_state: dict[str, object] = {}


def available() -> bool:
    """Whether the extension's operations can run here: on the CPU device, not turned off, built
    and loaded."""
    if os.environ.get("HAM_MLX_NO_MLX_EXT", "") not in ("", "0"):
        return False
    return mx.default_device() == mx.cpu and _load() is not None


def why_not() -> str | None:
    """Why the extension could not be built or loaded (None: it was, or was not tried yet)."""
    return _state.get("error")  # type: ignore[return-value]


def threads() -> int:
    """Threads for one operation: HAM_MLX_EXT_THREADS, else the CPUs this process may use."""
    value = os.environ.get("HAM_MLX_EXT_THREADS", "")
    return max(1, int(value)) if value else cpu_count()


def threads_for(arrays: list[mx.array]) -> int | None:
    """`threads()` for operations on these arrays, or None where MLX's operations must run
    instead (one of them not float32, or no extension here)."""
    if any(a.dtype != mx.float32 for a in arrays) or not available():
        return None
    return threads()


def module() -> ModuleType:
    """The loaded extension: `gdn_step`, `head_score`, `ham_admit`, `write_slot`, `ham_attend`,
    `swiglu` (see `_mlx_ext.cpp`)."""
    loaded = _load()
    if loaded is None:
        raise RuntimeError(f"the ham_mlx MLX extension is not available: {why_not()}")
    return loaded


def _load() -> ModuleType | None:
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    _state["module"] = None
    try:
        _state["module"] = _import(_build())
    except Exception as e:  # noqa: BLE001 - any failure leaves the MLX operations in place
        _state["error"] = f"{type(e).__name__}: {e}"
        _log.info("ham_mlx: the MLX extension is not used (%s)", _state["error"])
    return _state["module"]  # type: ignore[return-value]


def _toolchain() -> tuple[str, Path, Path]:
    """(compiler, MLX's package folder, nanobind's package folder), or an error saying which is
    missing."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("built on Linux only")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler (c++ or g++ on PATH, or CXX)")
    try:
        import nanobind
    except ImportError as e:
        raise RuntimeError("nanobind is not installed") from e
    mlx_dir = Path(mx.__file__).resolve().parent
    if not (mlx_dir / "include" / "mlx" / "mlx.h").exists() or not (mlx_dir / "lib").exists():
        raise RuntimeError(f"MLX's headers or library are missing under {mlx_dir}")
    return compiler, mlx_dir, Path(nanobind.__file__).resolve().parent


def _cache_dir() -> Path:
    """HAM_MLX_EXT_DIR, else ham_mlx/mlx_ext in the user's cache folder (one subfolder a build)."""
    chosen = os.environ.get("HAM_MLX_EXT_DIR")
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ham_mlx" / "mlx_ext"


def _cpu() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(
        next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags")
    )


def _build() -> Path:
    """The compiled extension's path: built now unless this source, MLX, nanobind and Python
    already have one in the cache folder (the new file is renamed into place when complete)."""
    compiler, mlx_dir, nb_dir = _toolchain()
    import nanobind

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = hashlib.sha256(
        "\n".join(
            [*(f.read_text() for f in (SOURCE, *HEADERS)), mx.__version__, str(mlx_dir),
             nanobind.__version__, suffix, compiler, _cpu(), *FLAGS]
        ).encode()
    ).hexdigest()[:16]  # fmt: skip
    target = _cache_dir() / key / f"_mlx_ext{suffix}"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: the temporary folder
        target = Path(tempfile.gettempdir()) / f"ham_mlx-{os.getuid()}" / key / target.name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    robin_map = nb_dir / "ext" / "robin_map" / "include"
    command = [
        compiler, *FLAGS, f"-I{SOURCE.parent}", f"-I{nb_dir / 'include'}", f"-I{robin_map}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}", str(SOURCE),
        str(nb_dir / "src" / "nb_combined.cpp"), f"-L{mlx_dir / 'lib'}", "-lmlx",
        f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", partial,
    ]  # fmt: skip
    _log.info("ham_mlx: building the MLX extension once (about 10 s) into %s", target.parent)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"the compiler failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ham_mlx._mlx_ext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _smoke(module)
    return module


def _smoke(module: ModuleType) -> None:
    """One tiny call: a nanobind that MLX does not share its types with fails here, not later."""
    f, i = mx.zeros((1,), dtype=mx.float32), mx.zeros((1,), dtype=mx.int32)
    count, _, slot = module.ham_admit(f, f, i, i, None)
    keys = module.write_slot(mx.zeros((1, 1, 2, 2)), slot, mx.ones((1, 1, 2)))
    out = module.ham_attend(
        mx.ones((1, 1, 2)), keys, keys, count, f, f, mx.zeros((1, 1)), mx.ones((2,)), None, 1e-6,
        None, 1,
    )  # fmt: skip
    mx.eval(out)

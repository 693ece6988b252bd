"""Fuzz targets (hypothesis) for the readers of untrusted files: safetensors (the converter's
reader and the loader's check before mx.load), torch zip checkpoints, config values and
prompt-cache files. Each target asserts that only the project's own error escapes and that every
example finishes quickly; tests/test_fuzz.py runs them in a child process under a time and an
address-space limit, so a hang or a huge allocation fails the test.

`python tests/fuzz_targets.py TARGET [EXAMPLES]` runs one target."""

from __future__ import annotations

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import atexit
import io
import json
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_files import Parameter, Tensor, fake_torch_save, torch_pickle

from ham_mlx.cache import PromptCacheError, load_prompt_cache, save_prompt_cache
from ham_mlx.config import ConfigError, ModelArgs
from ham_mlx.convert import ConversionError
from ham_mlx.convert.checkpoint import read_file
from ham_mlx.convert.safetensors_io import read_safetensors, write_safetensors
from ham_mlx.model_io import CheckpointError, read_weights

SECONDS_PER_EXAMPLE = 20.0  # generous: a shared machine stalls; a bomb takes far longer
WORK = Path(tempfile.mkdtemp(prefix="ham-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def bounded(call: Callable[[], object], allowed: tuple[type[Exception], ...]) -> None:
    """Run one example: only `allowed` errors may escape, and it must end within the limit."""
    start = time.perf_counter()
    try:
        call()
    except allowed:
        pass
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_EXAMPLE, f"one example took {elapsed:.1f} s"


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip


def mutate(raw: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (position, kind, value) edits: overwrite a byte, insert one, delete one, or cut."""
    b = bytearray(raw)
    for pos, kind, value in edits:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = value
        elif kind == 1:
            b.insert(pos, value)
        elif kind == 2:
            del b[pos]
        else:
            del b[pos:]
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 3), st.integers(0, 255)),
                 max_size=8)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip

# ---- safetensors -------------------------------------------------------------------------------


def valid_safetensors() -> bytes:
    path = WORK / "valid.safetensors"
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16),
              "c": np.zeros((0, 2), np.float32), "d": np.arange(3, dtype=np.int64)}  # fmt: skip
    write_safetensors(path, arrays)
    return path.read_bytes()


def read_both(raw: bytes) -> None:
    folder = WORK / "st"
    folder.mkdir(exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(raw)
    try:
        for t in read_safetensors(path).values():
            t.load()
    except ConversionError:
        pass
    read_weights(folder)  # the loader: header check, then mx.load


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "X", ""]) | JSON,
    "shape": st.lists(st.integers(-2, 5) | st.sampled_from([2**31, 2**62, 1.5, "2"]),
                      max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-8, 64), min_size=2, max_size=2) | JSON,
})  # fmt: skip


def fuzz_safetensors(examples: int) -> None:
    base = valid_safetensors()

    @fuzz_settings(examples)
    @given(EDITS)
    def bytes_level(edits):
        bounded(lambda: read_both(mutate(base, edits)), (ConversionError, CheckpointError))

    @fuzz_settings(examples)
    @given(st.dictionaries(st.text(max_size=4), ENTRY | JSON, max_size=4), st.integers(0, 80))
    def header_level(header, n):
        raw = json.dumps(header).encode()
        data = len(raw).to_bytes(8, "little") + raw + bytes(n)
        bounded(lambda: read_both(data), (ConversionError, CheckpointError))

    bytes_level()
    header_level()


# ---- torch zip ---------------------------------------------------------------------------------


def valid_torch_zip() -> bytes:
    storage = np.arange(12, dtype=np.float32)
    sd = {"w": Tensor(storage, 0, (3, 4), (4, 1)), "v": Tensor(storage, 2, (2, 2), (1, 4)),
          "p": Parameter(Tensor.of(np.ones(2, np.float16))),
          "n": {"step": 3, "lr": [0.1]}}  # fmt: skip
    fake_torch_save(sd, WORK / "valid.bin")
    return (WORK / "valid.bin").read_bytes()


def zip_with(pickle_bytes: bytes, members: dict[str, bytes], deflate: bool) -> bytes:
    buf = io.BytesIO()
    kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", kind) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for name, raw in members.items():
            z.writestr(f"archive/data/{name}", raw)
    return buf.getvalue()


def read_torch(raw: bytes) -> None:
    path = WORK / "fuzz.bin"
    path.write_bytes(raw)
    for t in read_file(path).values():
        t.load()


def fuzz_torch_zip(examples: int) -> None:
    base = valid_torch_zip()
    storage = np.arange(12, dtype=np.float32)
    pkl, _ = torch_pickle({"w": Tensor(storage, 0, (3, 4), (4, 1)), "k": {"a": [1, (2, 3)]}})
    members = {"0": storage.tobytes()}

    @fuzz_settings(examples)
    @given(EDITS)
    def file_level(edits):
        bounded(lambda: read_torch(mutate(base, edits)), (ConversionError,))

    @fuzz_settings(examples)
    @given(EDITS, st.booleans(), st.integers(0, 64))
    def pickle_level(edits, deflate, storage_bytes):
        raw = zip_with(mutate(pkl, edits), {"0": bytes(storage_bytes) or members["0"]}, deflate)
        bounded(lambda: read_torch(raw), (ConversionError,))

    file_level()
    pickle_level()


# ---- config ------------------------------------------------------------------------------------

VALID_CONFIG = ModelArgs(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_heads=2,
                         head_dim=16, layer_types=["ham", "gdn", "attn"],
                         attn={"num_heads": 2, "num_kv_heads": 1}, ham_router_hidden=8,
                         ).to_config()  # fmt: skip
NUMBERS = (st.integers(-(2**70), 2**70) | st.floats() | st.booleans() | st.none()
           | st.text(max_size=3) | st.sampled_from([0, -1, 2**31, 2**63, 10**6]))  # fmt: skip


def fuzz_config(examples: int) -> None:
    keys = [*sorted(VALID_CONFIG), "layer_types"]  # the old name of mixer_types too

    @fuzz_settings(examples)
    @given(st.dictionaries(st.sampled_from(keys), NUMBERS | JSON, max_size=4))
    def one_value_wrong(changes):
        config = {**VALID_CONFIG, **changes}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bounded(lambda: ModelArgs.from_dict(config), (ConfigError,))

    @fuzz_settings(examples)
    @given(st.dictionaries(st.sampled_from([*keys, "zzz"]), JSON, max_size=6))
    def anything(config):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bounded(lambda: ModelArgs.from_dict(config), (ConfigError,))

    one_value_wrong()
    anything()


# ---- prompt cache ------------------------------------------------------------------------------


def valid_prompt_cache():
    from ham_mlx import Model

    args = ModelArgs.from_dict(VALID_CONFIG)
    model = Model(args)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5]]), cache)
    save_prompt_cache(WORK / "valid.safetensors", cache, {"m": "x"})
    return model, (WORK / "valid.safetensors").read_bytes()


def fuzz_prompt_cache(examples: int) -> None:
    model, base = valid_prompt_cache()
    header_len = int.from_bytes(base[:8], "little")
    header = json.loads(base[8 : 8 + header_len])

    def load(raw: bytes) -> None:
        path = WORK / "fuzz-cache.safetensors"
        path.write_bytes(raw)
        load_prompt_cache(path, model=model)

    @fuzz_settings(examples)
    @given(EDITS)
    def bytes_level(edits):
        bounded(lambda: load(mutate(base, edits)), (PromptCacheError,))

    @fuzz_settings(examples)
    @given(st.sampled_from(sorted(header)), st.sampled_from(["dtype", "shape", "data_offsets"]),
           JSON | ENTRY)  # fmt: skip
    def header_level(name, field, value):
        h = json.loads(json.dumps(header))
        if name == "__metadata__" and isinstance(h[name], dict) and h[name]:
            h[name][sorted(h[name])[0]] = value if isinstance(value, str) else json.dumps(value)
        elif isinstance(h[name], dict):
            h[name][field] = value
        raw = json.dumps(h).encode()
        data = len(raw).to_bytes(8, "little") + raw + base[8 + header_len :]
        bounded(lambda: load(data), (PromptCacheError,))

    bytes_level()
    header_level()


TARGETS = {"safetensors": fuzz_safetensors, "torch_zip": fuzz_torch_zip, "config": fuzz_config,
           "prompt_cache": fuzz_prompt_cache}  # fmt: skip

if __name__ == "__main__":
    TARGETS[sys.argv[1]](int(sys.argv[2]) if len(sys.argv) > 2 else 50)
    print("OK")

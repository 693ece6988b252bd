"""Prompt-cache files: one safetensors file in mlx-lm's layout, read and written by both libraries.

Layout (mlx-lm 0.32's `save_prompt_cache`): tensor `"i.j"` is field j of layer i's `state`;
metadata `"0.<key>"` is the user's metadata, `"1.i"` layer i's cache class name, `"2.0"` is
empty and `"2.k.0"`/`"2.k.1"` say that tensor `"2.k.0"`'s entry is a Python scalar, a string or
None (`scalar`/`string`/`none`). Loading checks the file's header against its size before MLX
reads it, then every field against the cache class (and the model, when given).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.cache.attention import AttnCache
from ham_mlx.cache.checks import CacheStateError
from ham_mlx.cache.ham import HAMCache
from ham_mlx.cache.recurrent import GDNCache

CACHE_CLASSES = {c.__name__: c for c in (GDNCache, AttnCache, HAMCache)}
FIELDS = {"GDNCache": 3, "AttnCache": 6, "HAMCache": 9}
LAYER_TYPES = {"GDNCache": "gdn", "AttnCache": "attn", "HAMCache": "ham"}
MAX_HEADER_BYTES = 16 << 20
MAX_STRING = 1 << 20
ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "BOOL": 1, "F64": 8, "U64": 8}  # fmt: skip


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used; the message names the file and the field."""


def save_prompt_cache(path: str | Path, cache: list[Any], metadata: dict[str, str] | None = None):
    """Save a list of layer caches (and string metadata) to one safetensors file (mlx-lm's
    layout, so `mlx_lm.models.cache.load_prompt_cache` reads it too)."""
    arrays: dict[str, mx.array] = {}
    meta: dict[str, str] = {"2.0": ""}
    k = 1
    for i, c in enumerate(cache):
        for j, value in enumerate(c.state):
            name = f"{i}.{j}"
            if isinstance(value, mx.array):
                arrays[name] = value
                continue
            if value is None:
                kind, value = "none", mx.array([])
            elif isinstance(value, str):
                kind, value = "string", mx.array([ord(ch) for ch in value], dtype=mx.int32)
            elif isinstance(value, (bool, int, float)):
                kind, value = "scalar", mx.array(value)
            else:
                raise TypeError(f"layer {i} field {j}: cannot save a {type(value).__name__}")
            arrays[name] = value
            meta[f"2.{k}.0"], meta[f"2.{k}.1"] = name, kind
            k += 1
        meta[f"1.{i}"] = type(c).__name__
    for key, v in (metadata or {}).items():
        meta[f"0.{key}"] = str(v)
    mx.save_safetensors(str(path), arrays, metadata=meta)


def load_prompt_cache(path: str | Path, return_metadata: bool = False, model: Any = None):
    """The list of caches in a prompt-cache file (and its user metadata).

    Every field is checked before use; with `model`, also that each cache fits its layer.
    A file that fails gets one PromptCacheError naming the file, layer and field."""
    path = Path(path)
    _check_header(path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise PromptCacheError(f"{path}: not a readable safetensors file ({e})") from None
    classes, user, scalars = _parse_metadata(path, meta)
    fields = _fields(path, arrays, scalars, classes)
    cache = []
    for i, (name, state) in enumerate(zip(classes, fields)):
        try:
            cache.append(CACHE_CLASSES[name].from_state(state))
        except CacheStateError as e:
            raise PromptCacheError(f"{path}: layer {i}: {e}") from None
    if model is not None:
        check_against_model(cache, model, str(path))
    return (cache, user) if return_metadata else cache


def _check_header(path: Path) -> None:
    """The safetensors header: sizes, dtypes and offsets that fit the file, without overlaps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise PromptCacheError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PromptCacheError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise PromptCacheError(f"{path}: not a safetensors file (header is not an object)")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise PromptCacheError(f"{path}: metadata must map strings to strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = dtype in ST_DTYPES and all(type(d) is int and d >= 0 for d in shape)
            ok = ok and type(begin) is int and type(end) is int and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PromptCacheError(
                f"{path}: tensor {name!r}: bad header entry {json.dumps(info)[:200]} "
                "(dtype, shape, data_offsets)"
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel * ST_DTYPES[dtype] != end - begin or 8 + n + end > size:
            raise PromptCacheError(
                f"{path}: tensor {name!r}: shape {shape} {dtype} does not match its "
                f"{end - begin} bytes at offset {begin} of a {size}-byte file"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise PromptCacheError(f"{path}: tensors {a!r} and {b!r} overlap")


def _parse_metadata(path: Path, meta: dict[str, str]):
    classes: dict[int, str] = {}
    user: dict[str, str] = {}
    scalars: dict[str, str] = {}
    pairs: dict[int, dict[str, str]] = {}
    for key, value in meta.items():
        if key.startswith("0."):
            user[key[2:]] = value
        elif re.fullmatch(r"1\.\d{1,9}", key):
            classes[int(key[2:])] = value
        elif key == "2.0":
            continue
        elif m := re.fullmatch(r"2\.(\d{1,9})\.([01])", key):
            pairs.setdefault(int(m[1]), {})[m[2]] = value
        else:
            raise PromptCacheError(f"{path}: unexpected metadata key {key!r}")
    if not classes:
        raise PromptCacheError(f"{path}: not a prompt cache (no cache classes in the metadata)")
    if sorted(classes) != list(range(len(classes))):
        raise PromptCacheError(f"{path}: cache classes are not numbered 0..{len(classes) - 1}")
    for i, name in classes.items():
        if name not in CACHE_CLASSES:
            raise PromptCacheError(
                f"{path}: layer {i}: cache class {name!r} is not a ham_mlx cache "
                f"(expected one of {sorted(CACHE_CLASSES)})"
            )
    for k, pair in pairs.items():
        if set(pair) != {"0", "1"} or pair["1"] not in ("scalar", "string", "none"):
            raise PromptCacheError(f"{path}: scalar entry 2.{k} is malformed")
        if pair["0"] in scalars:
            raise PromptCacheError(f"{path}: tensor {pair['0']!r} has two scalar entries")
        scalars[pair["0"]] = pair["1"]
    return [classes[i] for i in range(len(classes))], user, scalars


def _fields(path: Path, arrays: dict[str, mx.array], scalars: dict[str, str], classes: list[str]):
    fields = [[None] * FIELDS[name] for name in classes]
    seen = set()
    for key, a in arrays.items():
        m = re.fullmatch(r"(\d{1,9})\.(\d{1,9})", key)
        if not m or int(m[1]) >= len(classes) or int(m[2]) >= FIELDS[classes[int(m[1])]]:
            raise PromptCacheError(f"{path}: unexpected tensor {key!r}")
        i, j = int(m[1]), int(m[2])
        where = f"{path}: layer {i} ({classes[i]}) field {j}"
        kind = scalars.get(key)
        if kind == "none":
            if a.size:
                raise PromptCacheError(f"{where}: a None entry must be empty")
            a = None
        elif kind == "scalar":
            if a.size != 1 or a.ndim != 0:
                raise PromptCacheError(f"{where}: a scalar entry must hold one value")
            a = a.item()
        elif kind == "string":
            a = _string(a, where)
        fields[i][j] = a
        seen.add(key)
    missing = set(scalars) - seen
    if missing:
        raise PromptCacheError(f"{path}: scalar entries {sorted(missing)} have no tensor")
    return fields


def _string(a: mx.array, where: str) -> str:
    if a.ndim != 1 or a.dtype not in (mx.int32, mx.int64, mx.uint32, mx.float32) or (
        a.size > MAX_STRING
    ):
        raise PromptCacheError(f"{where}: a string entry must be a vector of code points")
    codes = a.tolist()
    if any(not float(c).is_integer() or not 0 <= c <= 0x10FFFF or 0xD800 <= c <= 0xDFFF
           for c in codes):  # fmt: skip
        raise PromptCacheError(f"{where}: a string entry holds invalid code points")
    return "".join(chr(int(c)) for c in codes)


def check_against_model(cache: list[Any], model: Any, where: str = "prompt cache") -> None:
    """Each cache's class and array shapes against the model's layers (a clear error if not)."""
    if len(cache) != len(model.layers):
        raise PromptCacheError(f"{where}: {len(cache)} layer caches for a model of "
                               f"{len(model.layers)} layers")  # fmt: skip
    for i, (c, block) in enumerate(zip(cache, model.layers)):
        want = block.layer_type
        got = LAYER_TYPES.get(type(c).__name__)
        if got != want:
            raise PromptCacheError(f"{where}: layer {i} is {want!r} but its cache is {got!r}")
        problem = block.attn.cache_mismatch(c)
        if problem:
            raise PromptCacheError(f"{where}: layer {i} ({want}): {problem}")
    _check_offsets(cache, where)


def _check_offsets(cache: list[Any], where: str) -> None:
    """Every layer of one model has seen the same tokens in each row."""
    seen = [(i, c.offsets) for i, c in enumerate(cache) if c.offsets is not None]
    for i, offsets in seen[1:]:
        first, want = seen[0]
        if not np.array_equal(offsets, want):
            raise PromptCacheError(
                f"{where}: layer {i}: offsets {offsets.tolist()} differ from layer {first}'s "
                f"{want.tolist()} (tokens seen per row)"
            )

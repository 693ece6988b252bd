"""Prompt-cache files (spec §7): round trips between ham_mlx's and mlx-lm's save/load, checks
against the model, and tampered files that must fail with one clear error, never with a crash,
a hang or another exception type (each checked in a child process)."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core, and registers the caches)

# isort: split
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS, make_model

from ham_mlx.cache import PromptCacheError, load_prompt_cache, save_prompt_cache

lmc = pytest.importorskip("mlx_lm.models.cache")

TESTS = str(Path(__file__).resolve().parent)
MIXED = LAYER_CONFIGS["mixed"]  # ham, gdn, attn, ham
META = {"prompt": "twenty tokens, ünïcödé ✓", "model": "tiny"}
LENGTHS = [14, 20]  # real tokens per row of the prefill: rows end at different offsets
SEED = 3


def prefill(model, ids: mx.array, **controls) -> list:
    """A cache after a right-padded prefill of ids [2, 20] (rows of LENGTHS tokens)."""
    cache = model.make_cache(**controls)
    for c in cache:
        c.prepare(lengths=LENGTHS)
    model(ids[:, :20], cache)
    for c in cache:
        c.finalize()
    return cache


def token_ids(n: int = 26, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 61, (2, n)))


def continued(model, cache: list, ids: mx.array) -> list[np.ndarray]:
    """Logits of one-token steps on ids[:, 20:] (each row continues at its own offset)."""
    return [np.array(model(ids[:, t : t + 1], cache)) for t in range(20, ids.shape[1])]


# ---- round trips ------------------------------------------------------------------------------
CONTROLS = {
    "threshold-per-layer-reject": {"threshold": [0.5, 0.8], "max_kv_tokens": 9,
                                   "kv_policy": "reject"},
    "budget-evict": {"kv_budget": [0.3, 0.6], "max_kv_tokens": 7},
}  # fmt: skip
ROUND_TRIPS = [(name, None) for name in LAYER_CONFIGS] + [
    ("mixed", "threshold-per-layer-reject"),
    ("mixed", "budget-evict"),
]
DIRECTIONS = {
    "ours-to-mlx_lm": (save_prompt_cache, lmc.load_prompt_cache),
    "mlx_lm-to-ours": (lmc.save_prompt_cache, load_prompt_cache),
    "ours-to-ours": (save_prompt_cache, load_prompt_cache),
}


def controls_of(cache: list) -> list:
    return [c.admission.to_json() for c in cache if hasattr(c, "admission")]


def round_trip(tmp_path, name, controls):
    layers, kw = LAYER_CONFIGS[name]
    model = make_model(layers, **kw)
    ids = token_ids()
    cache = prefill(model, ids, **CONTROLS.get(controls, {}))
    loaded = {}
    for direction, (save, load) in DIRECTIONS.items():
        path = tmp_path / f"{direction}.safetensors"
        save(str(path), cache, META)
        loaded[direction] = load(str(path), return_metadata=True)
    return model, ids, cache, loaded


@pytest.mark.parametrize("name,controls", ROUND_TRIPS,
                         ids=[f"{n}-{c}" if c else n for n, c in ROUND_TRIPS])  # fmt: skip
def test_round_trip_between_ours_and_mlx_lm(tmp_path, name, controls):
    model, ids, cache, loaded = round_trip(tmp_path, name, controls)
    for direction, (got, meta) in loaded.items():
        assert meta == META, direction
        assert [type(c) for c in got] == [type(c) for c in cache], direction
        for c, g in zip(cache, got):
            np.testing.assert_array_equal(g.offsets, LENGTHS, err_msg=direction)
            np.testing.assert_array_equal(g.offsets, c.offsets, err_msg=direction)
        assert controls_of(got) == controls_of(cache), direction
    want = continued(model, cache, ids)
    for direction, (got, _) in loaded.items():
        for step, (w, g) in enumerate(zip(want, continued(model, got, ids))):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0,
                                       err_msg=f"{direction}, step {step}")  # fmt: skip


def test_round_trip_continues_a_kv_budget_exactly(tmp_path):
    model, ids, cache, loaded = round_trip(tmp_path, "mixed", "budget-evict")
    want = continued(model, cache, ids)
    got = continued(model, loaded["ours-to-ours"][0], ids)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_empty_caches_and_no_metadata_round_trip(tmp_path):
    model = make_model(MIXED[0], **MIXED[1])
    cache = model.make_cache(threshold=0.7)
    for direction, (save, load) in DIRECTIONS.items():
        path = tmp_path / f"{direction}.safetensors"
        save(str(path), cache)
        got = load(str(path))
        assert [c.empty() for c in got] == [True] * 4, direction
        assert controls_of(got) == controls_of(cache), direction
    meta = load_prompt_cache(tmp_path / "mlx_lm-to-ours.safetensors", return_metadata=True)[1]
    assert meta == {}


# ---- the model's layers -----------------------------------------------------------------------
ATTN = {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 10000.0}
OTHER_MODELS = {
    "last-layer-gdn": ((("ham", "gdn", "attn", "gdn"), {}), "layer 3"),
    "second-layer-attn": ((("ham", "attn", "attn", "ham"), {}), "layer 1"),
    "first-layer-attn": ((("attn", "gdn", "attn", "ham"), {}), "layer 0"),
    "ham-head-size": ((MIXED[0], {"head_dim": 8}), "layer 0"),
    "ham-v-heads": ((MIXED[0], {"num_v_heads": 4}), "layer 0"),
    "ham-conv-size": ((MIXED[0], {"conv_size": 2}), "layer 0"),
    "attn-head-size": ((MIXED[0], {"attn": {**ATTN, "num_heads": 4}}), "layer 2"),
    "attn-kv-heads": ((MIXED[0], {"attn": {**ATTN, "num_kv_heads": 2}}), "layer 2"),
    "attn-window": ((MIXED[0], {"attn": {**ATTN, "window_size": 5}}), "layer 2"),
    "fewer-layers": ((("ham", "gdn", "attn"), {}), "3 layers"),
}  # fmt: skip


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    model = make_model(MIXED[0], seed=SEED, **MIXED[1])
    cache = prefill(model, token_ids(), threshold=[0.5, 0.8], kv_budget=[None, 0.3],
                    max_kv_tokens=9, kv_policy="reject")  # fmt: skip
    path = tmp_path_factory.mktemp("mixed") / "mixed.safetensors"
    save_prompt_cache(path, cache, META)
    return path


@pytest.mark.parametrize("other", sorted(OTHER_MODELS))
def test_a_cache_for_another_model_is_refused_naming_the_layer(mixed_file, other):
    (layers, kw), names = OTHER_MODELS[other]
    model = make_model(layers, **kw)
    with pytest.raises(PromptCacheError) as e:
        load_prompt_cache(mixed_file, model=model)
    assert names in str(e.value) and str(mixed_file) in str(e.value)


def test_the_same_model_loads_and_continues(mixed_file):
    model = make_model(MIXED[0], seed=SEED, **MIXED[1])
    cache = load_prompt_cache(mixed_file, model=model)
    mx.eval(model(mx.array([[1], [2]]), cache))


# ---- tampered files ---------------------------------------------------------------------------
# The "mixed" file: layer 0 a HAM cache (fixed τ 0.5, full at max_kv_tokens=9), layer 1 GDN,
# layer 2 attention (no window: field 5 is None), layer 3 HAM (kv_budget 0.3; row 0 has an
# unused slot). Rows have seen 14 and 20 tokens.
FIELDS = {
    0: ("HAMCache", ["conv", "ssm", "keys", "values", "positions", "scores", "count", "offsets"]),
    1: ("GDNCache", ["conv", "ssm", "offsets"]),
    2: ("AttnCache", ["keys", "values", "positions", "count", "offsets"]),
}
NDIM = {"conv": 3, "ssm": 4, "keys": 4, "values": 4, "positions": 2, "scores": 2, "count": 1,
        "offsets": 1}  # fmt: skip
INT_FIELDS = ("positions", "count", "offsets")


class Variant(NamedTuple):
    name: str
    edit: Callable  # (arrays, meta) -> None, editing in place; raw: bytes -> bytes
    ok: bool = False  # a harmless edit: loads and runs
    names: tuple[str, ...] = ()  # what the error message must name (besides the file)
    raw: bool = False


def np_edit(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[mx.array], mx.array]:
    """An array edit done in numpy (int64/float32 copies, cast back to the dtype)."""

    def edit(a: mx.array) -> mx.array:
        h = np.array(a).copy()
        return mx.array(fn(h).astype(h.dtype))

    return edit


def _set_first(value):
    def fn(h):
        h.flat[0] = value
        return h

    return np_edit(fn)


ARRAY_EDITS_INT = {
    "huge": np_edit(lambda h: np.full_like(h, 10**9)),
    "negative": _set_first(-1),
    "uint32-max": lambda a: mx.full(a.shape, 2**32 - 1, dtype=mx.uint32),
    "float": lambda a: a.astype(mx.float32),
    "bool": lambda a: a.astype(mx.bool_),
}
ARRAY_EDITS_FLOAT = {
    "nan": _set_first(np.nan),
    "inf": _set_first(np.inf),
    "neg-inf": _set_first(-np.inf),
    "int": lambda a: a.astype(mx.int32),
    "bool": lambda a: a.astype(mx.bool_),
    "complex": lambda a: a.astype(mx.complex64),
}
ARRAY_EDITS_SHAPE = {
    "extra-dim": lambda a: a[None],
    "fewer-dims": lambda a: a[0],
    "one-row": lambda a: a[:1],
    "three-rows": lambda a: mx.concatenate([a, a[:1]]),
    "zero-rows": lambda a: a[:0],
    "missing": None,  # the tensor is deleted
}
SLOT_EDITS = {  # the slot axis of 4-D arrays (conv: its Kc-1 axis; ssm: Dv) and 2-D ones
    "one-slot-less": lambda a: a[:, :, :-1] if a.ndim == 4 else a[:, :-1],
    "one-slot-more": lambda a: mx.concatenate(
        [a, a[:, :, :1] if a.ndim == 4 else a[:, :1]], axis=2 if a.ndim == 4 else 1
    ),
    "zero-slots": lambda a: a[:, :, :0] if a.ndim == 4 else a[:, :0],
}
LAST_DIM_EDITS = {
    "last-dim-less": lambda a: a[..., :-1],
    "axis-1-more": lambda a: mx.concatenate([a, a[:, :1]], axis=1),  # heads (conv: Kc-1)
}


def field_variants() -> list[Variant]:
    out = []
    for layer, (cls, names) in FIELDS.items():
        for j, field in enumerate(names):
            key = f"{layer}.{j}"
            edits = dict(ARRAY_EDITS_INT if field in INT_FIELDS else ARRAY_EDITS_FLOAT)
            edits.update(ARRAY_EDITS_SHAPE)
            if NDIM[field] >= 2:
                edits.update(SLOT_EDITS)
            if NDIM[field] >= 3:
                edits.update(LAST_DIM_EDITS)
            if field == "offsets":  # also a row whose count now exceeds its offset
                edits["one-less"] = np_edit(lambda h: h - 1)
            for edit_name, fn in edits.items():
                # MLX writes complex64 ("C64"), which the header check refuses first
                names = (key,) if edit_name == "complex" else (f"layer {layer}",)
                out.append(Variant(f"L{layer}-{cls}-{field}-{edit_name}", _array_edit(key, fn),
                                   names=names))  # fmt: skip
    # float16 keys/values are a dtype a cache may hold (a float16 model's)
    out += [
        Variant("L0-HAMCache-keys-values-float16", _cast(["0.2", "0.3"], mx.float16), ok=True),
        Variant("L2-AttnCache-keys-values-float16", _cast(["2.0", "2.1"], mx.float16), ok=True),
        Variant("L0-HAMCache-keys-float16-only", _cast(["0.2"], mx.float16),
                names=("layer 0",)),
        Variant("L2-AttnCache-values-bfloat16-only", _cast(["2.1"], mx.bfloat16),
                names=("layer 2",)),
        Variant("L1-GDNCache-ssm-float16", _cast(["1.1"], mx.float16), names=("layer 1",)),
        Variant("L0-HAMCache-scores-float16", _cast(["0.5"], mx.float16), names=("layer 0",)),
        # positions past a row's count are never read (row 0 of layer 3 has an unused slot,
        # row 0 of layer 2 six)
        Variant("L3-HAMCache-positions-unused-slot-huge",
                _array_edit("3.4", np_edit(lambda h: _put(h, (0, -1), 10**9))), ok=True),
        Variant("L2-AttnCache-positions-unused-slot-negative",
                _array_edit("2.2", np_edit(lambda h: _put(h, (0, -1), -5))), ok=True),
        # used positions out of order, repeated, or at/after the row's offset
        Variant("L0-HAMCache-positions-repeated",
                _array_edit("0.4", np_edit(lambda h: _put(h, (1, 1), 0))), names=("layer 0",)),
        Variant("L2-AttnCache-positions-at-offset",
                _array_edit("2.2", np_edit(lambda h: _put(h, (1, -1), 20))), names=("layer 2",)),
        Variant("L2-AttnCache-count-less-than-offsets",
                _array_edit("2.3", np_edit(lambda h: h - 1)), names=("layer 2",)),
        Variant("L3-HAMCache-count-one-more",
                _array_edit("3.6", np_edit(lambda h: h + 1)), names=("layer 3",)),
    ]  # fmt: skip
    return out


def _put(h: np.ndarray, index, value) -> np.ndarray:
    h[index] = value
    return h


def _array_edit(key: str, fn) -> Callable:
    def edit(arrays, meta):
        if fn is None:
            del arrays[key]
        else:
            arrays[key] = fn(arrays[key])

    return edit


def _cast(keys: list[str], dtype) -> Callable:
    def edit(arrays, meta):
        for k in keys:
            arrays[k] = arrays[k].astype(dtype)

    return edit


# ---- metadata: class names and the scalar/string/None markers ---------------------------------
def _meta(**changes) -> Callable:
    """Set (value) or delete (None) metadata keys (keys spelled with "_" for ".")."""

    def edit(arrays, meta):
        for k, v in changes.items():
            k = k.replace("_", ".")
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v

    return edit


def _marker(target: str, kind: str | None = None, points_at: str | None = None,
            drop: str | None = None) -> Callable:  # fmt: skip
    """Edit the marker of tensor `target` (kind, which tensor it points at, or drop half of it),
    or add one when it has none."""

    def edit(arrays, meta):
        ks = [k for k in meta if k.startswith("2.") and k.endswith(".0") and meta[k] == target]
        if ks:
            base = ks[0][:-2]
        else:
            base = f"2.{1 + max(int(k.split('.')[1]) for k in meta if k.count('.') == 2)}"
            meta[base + ".0"], meta[base + ".1"] = target, kind or "none"
        if kind is not None:
            meta[base + ".1"] = kind
        if points_at is not None:
            meta[base + ".0"] = points_at
        if drop is not None:
            del meta[f"{base}.{drop}"]

    return edit


def _window(value, kind="scalar") -> Callable:
    def edit(arrays, meta):
        if kind == "string":
            arrays["2.5"] = mx.array([ord(c) for c in str(value)], dtype=mx.int32)
        else:
            arrays["2.5"] = mx.array(value)
        _marker("2.5", kind)(arrays, meta)

    return edit


def _two_markers(arrays, meta):
    _marker("0.8")(arrays, meta)  # the controls' own marker stays
    meta["2.9.0"], meta["2.9.1"] = "0.8", "none"


def _unmark_controls(arrays, meta):
    key = next(k for k in meta if k.startswith("2.") and meta[k] == "0.8")
    del meta[key], meta[key[:-1] + "1"]


METADATA_VARIANTS = [
    Variant("class-unknown", _meta(**{"1_1": "FooCache"}), names=("layer 1", "FooCache")),
    Variant("class-KVCache", _meta(**{"1_2": "KVCache"}), names=("layer 2", "KVCache")),
    Variant("class-ArraysCache", _meta(**{"1_1": "ArraysCache"}), names=("layer 1",)),
    Variant("class-dunder", _meta(**{"1_0": "__class__"}), names=("layer 0",)),
    Variant("class-empty-name", _meta(**{"1_0": ""}), names=("layer 0",)),
    Variant("class-missing-index", _meta(**{"1_2": None}), names=("numbered",)),
    Variant("class-all-missing", _meta(**{f"1_{i}": None for i in range(4)})),
    Variant("class-extra-layer", _meta(**{"1_4": "AttnCache"}), names=("4 layers",)),
    Variant("class-gdn-as-ham", _meta(**{"1_1": "HAMCache"}), names=("layer 1",)),
    Variant("class-ham-as-gdn", _meta(**{"1_0": "GDNCache"}), names=("0.3",)),
    Variant("class-attn-as-gdn", _meta(**{"1_2": "GDNCache"}), names=("2.",)),
    Variant("class-ham-as-attn", _meta(**{"1_3": "AttnCache"}), names=("3.",)),
    Variant("class-key-not-a-number", _meta(**{"1_x": "GDNCache"}), names=("1.x",)),
    Variant("class-key-huge-index", _meta(**{"1_999999999": "GDNCache"}), names=("numbered",)),
    Variant("unexpected-metadata-key", _meta(**{"3_0": "x"}), names=("3.0",)),
    Variant("no-2_0-key", _meta(**{"2_0": None}), ok=True),  # mlx-lm's placeholder, unused
    Variant("user-metadata-long", _meta(**{"0_notes": "x" * 100000}), ok=True),
    Variant("marker-kind-unknown", _marker("0.8", "pickle"), names=("2.",)),
    Variant("marker-kind-wrong-type", _marker("0.8", "scalar"), names=("layer 0",)),
    Variant("marker-string-as-none", _marker("0.8", "none"), names=("layer 0",)),
    Variant("marker-none-as-string", _marker("2.5", "string"), names=("layer 2", "window")),
    Variant("marker-none-as-scalar", _marker("2.5", "scalar"), names=("layer 2",)),
    Variant("marker-missing-tensor", _marker("0.8", points_at="9.9"), names=("9.9",)),
    Variant("marker-bad-tensor-name", _marker("2.5", points_at="window"), names=("window",)),
    Variant("marker-half-missing", _marker("0.8", drop="1"), names=("2.",)),
    Variant("marker-other-half-missing", _marker("2.5", drop="0"), names=("2.",)),
    Variant("marker-removed-from-string", _unmark_controls, names=("layer 0", "controls")),
    Variant("marker-on-array-none", _marker("2.0", "none"), names=("layer 2",)),
    Variant("marker-on-array-string", _marker("0.0", "string"), names=("layer 0",)),
    Variant("marker-on-count-string", _marker("2.3", "string"), names=("layer 2",)),
    Variant("marker-on-count-scalar", _marker("2.3", "scalar"), names=("layer 2",)),
    Variant("marker-on-offsets-none", _marker("1.2", "none"), names=("layer 1",)),
    Variant("marker-twice-for-one-tensor", _two_markers, names=("0.8",)),
    Variant("window-zero", _window(0), names=("layer 2", "window")),
    Variant("window-negative", _window(-3), names=("layer 2", "window")),
    Variant("window-huge", _window(10**9), names=("layer 2", "window")),
    Variant("window-int64-huge", _window(mx.array(2**40, dtype=mx.int64)),
            names=("layer 2", "window")),
    Variant("window-other-than-model", _window(5), names=("layer 2", "window")),
    Variant("window-float", _window(2.5), names=("layer 2", "window")),
    Variant("window-nan", _window(float("nan")), names=("layer 2", "window")),
    Variant("window-bool", _window(True), names=("layer 2", "window")),
    Variant("window-string", _window("5", "string"), names=("layer 2", "window")),
]  # fmt: skip


# ---- the HAM controls (a JSON string) ---------------------------------------------------------
def _controls(layer: int, text: str | Callable[[dict], dict], codes=None) -> Callable:
    """Replace layer's controls by text (or fn(parsed controls) -> dict), or by raw code points."""

    def edit(arrays, meta):
        key = f"{layer}.8"
        if codes is not None:
            arrays[key] = codes
            return
        s = text
        if callable(text):
            s = json.dumps(text(json.loads("".join(chr(c) for c in arrays[key].tolist()))))
        arrays[key] = mx.array([ord(c) for c in s], dtype=mx.int32)

    return edit


def _with(**changes) -> Callable[[dict], dict]:
    return lambda d: {**d, **changes}


def _without(key: str) -> Callable[[dict], dict]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _raw_json(layer: int, **changes) -> Callable:
    """Controls with fields written as raw JSON text (NaN, 1e400, 10**400)."""

    def fn(arrays, meta):
        d = json.loads("".join(chr(c) for c in arrays[f"{layer}.8"].tolist()))
        parts = [f'"{k}": {changes[k] if k in changes else json.dumps(v)}' for k, v in d.items()]
        _controls(layer, "{" + ", ".join(parts) + "}")(arrays, meta)

    return fn


C0 = ("layer 0",)
C3 = ("layer 3",)
CONTROL_VARIANTS = [
    Variant("controls-not-json", _controls(0, "{nope"), names=C0),
    Variant("controls-empty-string", _controls(0, ""), names=C0),
    Variant("controls-deep-lists", _controls(0, "[" * 100000), names=C0),
    Variant("controls-deep-objects", _controls(0, '{"a":' * 50000), names=C0),
    Variant("controls-a-list", _controls(0, "[]"), names=C0),
    Variant("controls-a-number", _controls(0, "1"), names=C0),
    Variant("controls-null", _controls(0, "null"), names=C0),
    Variant("controls-missing-key", _controls(0, _without("kv_policy")), names=C0),
    Variant("controls-extra-key", _controls(0, _with(evil=1)), names=C0),
    Variant("controls-threshold-nan", _raw_json(0, threshold="NaN"), names=C0),
    Variant("controls-threshold-int-too-big", _raw_json(0, threshold="1" + "0" * 400),
            names=C0),
    Variant("controls-threshold-string", _controls(0, _with(threshold="0.5")), names=C0),
    Variant("controls-threshold-bool", _controls(0, _with(threshold=True)), names=C0),
    Variant("controls-threshold-list", _controls(0, _with(threshold=[0.5])), names=C0),
    # a τ below every score admits all tokens, one above all admits none: make_cache accepts both
    Variant("controls-threshold-negative", _controls(0, _with(threshold=-3.0)), ok=True),
    Variant("controls-threshold-huge", _controls(0, _with(threshold=1e30)), ok=True),
    Variant("controls-row-threshold-nan", _raw_json(0, row_thresholds="[NaN, 0.5]"),
            names=C0),
    Variant("controls-row-threshold-int-too-big",
            _raw_json(0, row_thresholds="[0.5, 1" + "0" * 400 + "]"), names=C0),
    Variant("controls-row-threshold-string", _controls(0, _with(row_thresholds=["a", 0.5])),
            names=C0),
    Variant("controls-row-thresholds-three-rows",
            _controls(0, _with(row_thresholds=[0.5] * 3, row_budgets=[None] * 3)), names=C0),
    Variant("controls-row-thresholds-one-row",
            _controls(0, _with(row_thresholds=[0.5], row_budgets=[None])), names=C0),
    Variant("controls-row-thresholds-not-a-list", _controls(0, _with(row_thresholds=0.5)),
            names=C0),
    Variant("controls-row-budgets-missing-rows", _controls(0, _with(row_budgets=None)),
            names=C0),
    Variant("controls-row-lists-of-different-lengths",
            _controls(0, _with(row_thresholds=[0.5, 0.5, 0.5])), names=C0),
    Variant("controls-budget-nan", _raw_json(3, kv_budget="NaN"), names=C3),
    Variant("controls-budget-negative", _controls(3, _with(kv_budget=-0.1)), names=C3),
    Variant("controls-budget-huge", _controls(3, _with(kv_budget=1e30)), names=C3),
    Variant("controls-budget-inf", _raw_json(3, kv_budget="1e400"), names=C3),
    Variant("controls-budget-int-too-big", _raw_json(3, kv_budget="1" + "0" * 400), names=C3),
    Variant("controls-budget-5000-digits", _raw_json(3, kv_budget="1" * 5000), names=C3),
    Variant("controls-row-budget-nan", _raw_json(3, row_budgets="[NaN, 0.3]"), names=C3),
    Variant("controls-row-budget-negative", _controls(3, _with(row_budgets=[0.3, -1.0])),
            names=C3),
    Variant("controls-row-budget-string", _controls(3, _with(row_budgets=["0.3", 0.3])),
            names=C3),
    Variant("controls-row-budget-huge", _controls(3, _with(row_budgets=[0.3, 1e30])), names=C3),
    Variant("controls-max-kv-tokens-negative", _controls(0, _with(max_kv_tokens=-1)), names=C0),
    Variant("controls-max-kv-tokens-zero", _controls(0, _with(max_kv_tokens=0)), names=C0),
    Variant("controls-max-kv-tokens-huge", _controls(0, _with(max_kv_tokens=2**40)), names=C0),
    Variant("controls-max-kv-tokens-float", _controls(0, _with(max_kv_tokens=9.5)), names=C0),
    Variant("controls-max-kv-tokens-nan", _raw_json(0, max_kv_tokens="NaN"), names=C0),
    Variant("controls-max-kv-tokens-bool", _controls(0, _with(max_kv_tokens=True)), names=C0),
    Variant("controls-max-kv-tokens-string", _controls(0, _with(max_kv_tokens="9")), names=C0),
    Variant("controls-max-kv-tokens-below-count", _controls(0, _with(max_kv_tokens=2)),
            names=C0),
    Variant("controls-policy-unknown", _controls(0, _with(kv_policy="drop")), names=C0),
    Variant("controls-policy-number", _controls(0, _with(kv_policy=1)), names=C0),
    Variant("controls-policy-list", _controls(0, _with(kv_policy=["evict"])), names=C0),
    # another legitimate policy at the same cap: the file's rows fit it
    Variant("controls-policy-evict", _controls(0, _with(kv_policy="evict")), ok=True),
    Variant("controls-surrogate-code-point",
            _controls(0, "", codes=mx.array([123, 0xD800, 125], dtype=mx.int32)), names=C0),
    Variant("controls-negative-code-point",
            _controls(0, "", codes=mx.array([123, -1, 125], dtype=mx.int32)), names=C0),
    Variant("controls-code-point-too-big",
            _controls(0, "", codes=mx.array([123, 0x110000, 125], dtype=mx.int32)), names=C0),
    Variant("controls-fractional-code-points",
            _controls(0, "", codes=mx.array([123.5, 125.0], dtype=mx.float32)), names=C0),
    Variant("controls-2d-code-points",
            _controls(0, "", codes=mx.array([[123, 125]], dtype=mx.int32)), names=C0),
    Variant("controls-bool-code-points",
            _controls(0, "", codes=mx.array([True, False])), names=C0),
    Variant("controls-over-1MiB", _controls(0, " " * (1 << 20) + "{}"), names=C0),
]  # fmt: skip


# ---- raw damage (bytes) -----------------------------------------------------------------------
def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _header(fn: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(raw):
        header, body = split(raw)
        fn(header)
        return join(header, body)

    return edit


def _entry(name: str, **changes) -> Callable[[bytes], bytes]:
    return _header(lambda h: h[name].update(changes))


def _overlap(h: dict) -> None:
    """count of layer 0 [2] int32 moved to start 4 bytes into layer 0's offsets."""
    begin = h["0.7"]["data_offsets"][0] + 4
    h["0.6"]["data_offsets"] = [begin, begin + 8]


def _duplicate(bad_last: bool) -> Callable[[bytes], bytes]:
    def edit(raw):
        header, body = split(raw)
        good = json.dumps(header).encode()
        bad = b'"0.1":{"data_offsets":[0,999999996],"dtype":"F32","shape":[249999999]}'
        h = good[:-1] + b"," + bad + b"}" if bad_last else b"{" + bad + b"," + good[1:]
        return join(h, body)

    return edit


RAW_VARIANTS = [
    Variant("raw-empty-file", lambda raw: b""),
    Variant("raw-four-bytes", lambda raw: raw[:4]),
    Variant("raw-truncated-header", lambda raw: raw[:40]),
    Variant("raw-truncated-data", lambda raw: raw[:-100]),
    Variant("raw-truncated-to-header", lambda raw: raw[: 8 + struct.unpack("<Q", raw[:8])[0]]),
    Variant("raw-header-length-huge", lambda raw: struct.pack("<Q", 2**62) + raw[8:]),
    Variant("raw-header-length-max", lambda raw: b"\xff" * 8 + raw[8:]),
    Variant("raw-header-length-past-end", lambda raw: struct.pack("<Q", len(raw)) + raw[8:]),
    Variant("raw-header-length-short", lambda raw: struct.pack("<Q", 10) + raw[8:]),
    Variant("raw-header-not-json", lambda raw: join(b"{" + b"\x00" * 30 + b"}", b"")),
    Variant("raw-header-a-list", lambda raw: join(b"[]", split(raw)[1])),
    Variant("raw-header-not-utf8", lambda raw: join(b'{"\xff\xfe": 1}', split(raw)[1])),
    Variant("raw-header-deep-nesting", lambda raw: join(b"[" * 100000, split(raw)[1])),
    Variant("raw-overlapping-data-offsets", _header(_overlap), names=("overlap",)),
    Variant("raw-same-data-offsets", _header(lambda h: h["0.6"].update(
        data_offsets=h["0.7"]["data_offsets"])), names=("overlap",)),
    Variant("raw-offsets-past-end", _entry("0.1", data_offsets=[0, 10**12]), names=("0.1",)),
    Variant("raw-offsets-negative", _entry("0.6", data_offsets=[-8, 0]), names=("0.6",)),
    Variant("raw-offsets-reversed", _header(lambda h: h["0.6"].update(
        data_offsets=h["0.6"]["data_offsets"][::-1])), names=("0.6",)),
    Variant("raw-offsets-floats", _header(lambda h: h["0.6"].update(
        data_offsets=[float(x) for x in h["0.6"]["data_offsets"]])), names=("0.6",)),
    Variant("raw-shape-not-matching-bytes", _entry("0.1", shape=[2, 2, 32, 17]),
            names=("0.1",)),
    Variant("raw-shape-huge", _entry("0.1", shape=[2**40, 2**40, 2**40]), names=("0.1",)),
    Variant("raw-shape-negative", _entry("0.1", shape=[-2, 2, 32, 16]), names=("0.1",)),
    Variant("raw-shape-not-a-list", _entry("0.1", shape="big"), names=("0.1",)),
    Variant("raw-dtype-unknown", _entry("0.1", dtype="F8_E4M3"), names=("0.1",)),
    Variant("raw-dtype-int-relabelled-float", _entry("0.6", dtype="F32"), names=("layer 0",)),
    Variant("raw-dtype-float-relabelled-int", _entry("1.1", dtype="I32"), names=("layer 1",)),
    Variant("raw-entry-missing-dtype", _header(lambda h: h["0.1"].pop("dtype")),
            names=("0.1",)),
    Variant("raw-metadata-not-strings", _header(lambda h: h["__metadata__"].update(
        {"1.0": 5})), names=("metadata",)),
    Variant("raw-metadata-a-list", _header(lambda h: h.update(__metadata__=[])),
            names=("metadata",)),
    Variant("raw-duplicate-key-bad-last", _duplicate(True), names=("0.1",)),
    # both MLX and Python's json keep a duplicate key's last entry: the valid one is read
    Variant("raw-duplicate-key-bad-first", _duplicate(False), ok=True),
    # bytes after the last tensor are never read
    Variant("raw-trailing-bytes", lambda raw: raw + b"\x00" * 64, ok=True),
]  # fmt: skip
RAW_VARIANTS = [v._replace(raw=True) for v in RAW_VARIANTS]

VARIANTS = field_variants() + METADATA_VARIANTS + CONTROL_VARIANTS + RAW_VARIANTS
assert len({v.name for v in VARIANTS}) == len(VARIANTS)
BY_NAME = {v.name: v for v in VARIANTS}


def write_variant(base: Path, v: Variant, folder: Path) -> Path:
    path = folder / f"{v.name}.safetensors"
    if v.raw:
        path.write_bytes(v.edit(base.read_bytes()))
    else:
        arrays, meta = mx.load(str(base), return_metadata=True)
        v.edit(arrays, meta)
        mx.save_safetensors(str(path), arrays, metadata=meta)
    return path


# ---- running variants in child processes ------------------------------------------------------
OURS = r"""
import json, sys, time
sys.path.insert(0, TESTS)
import ham_mlx  # noqa: F401
import mlx.core as mx
from conftest import LAYER_CONFIGS, make_model
from ham_mlx.cache import load_prompt_cache

layers, kw = LAYER_CONFIGS["mixed"]
model = make_model(layers, seed=SEED, **kw)

def attempt(path):
    cache = load_prompt_cache(path, model=model)
    mx.eval(model(mx.array([[1], [2]]), cache))
"""
THEIRS = r"""
import json, sys, time
import ham_mlx  # noqa: F401
from mlx_lm.models.cache import load_prompt_cache

def attempt(path):
    load_prompt_cache(path)
"""
LOOP = r"""
for name, path in json.loads(sys.argv[1]):
    print("BEGIN", name, flush=True)
    t = time.perf_counter()
    try:
        attempt(path)
        out = {"outcome": "OK"}
    except Exception as e:
        out = {"outcome": "raised", "type": type(e).__module__ + "." + type(e).__qualname__,
               "message": str(e)[:3000]}
    out["seconds"] = time.perf_counter() - t
    print("RESULT", name, json.dumps(out), flush=True)
"""


def run_children(script: str, items: list[tuple[str, str]], timeout: float = 60) -> dict:
    """Run `attempt(path)` for each (name, path) in child processes, several per process; a
    crash or hang is charged to the variant it happened in, and the rest run in a new process."""
    results: dict[str, dict] = {}
    pending = list(items)
    while pending:
        batch = [n for n, _ in pending]
        try:
            p = subprocess.run([sys.executable, "-c", script, json.dumps(pending)],
                               capture_output=True, text=True, timeout=timeout)  # fmt: skip
            out, err, status = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, status = _text(e.stdout), _text(e.stderr), f"hang (over {timeout} s)"
        begun = None
        for line in out.splitlines():
            if line.startswith("BEGIN "):
                begun = line.split(" ", 1)[1]
            elif line.startswith("RESULT "):
                _, name, data = line.split(" ", 2)
                results[name], begun = json.loads(data), None
        if status != 0:
            failed = {"outcome": "crash", "status": status, "stderr": err[-3000:]}
            # the variant it died in; dying before any or after all charges the whole batch
            for name in [begun] if begun is not None else batch:
                results[name] = failed
        pending = [(n, p) for n, p in pending if n not in results]
    return results


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def run_parallel(script: str, items: list[tuple[str, str]], groups: int = 4) -> dict:
    chunks = [items[i::groups] for i in range(groups)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = pool.map(lambda chunk: run_children(script, chunk), chunks)
    return {k: v for part in parts for k, v in part.items()}


@pytest.fixture(scope="module")
def tampered(mixed_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tampered")
    paths = {v.name: str(write_variant(mixed_file, v, folder)) for v in VARIANTS}
    script = OURS.replace("TESTS", repr(TESTS)).replace("SEED", str(SEED)) + LOOP
    return paths, run_parallel(script, list(paths.items()))


def test_the_child_harness_charges_crashes_and_hangs_to_their_variant():
    script = (
        "import json, sys, time\n"
        "def attempt(path):\n"
        "    if path == 'crash':\n"
        "        import ctypes; ctypes.string_at(0)\n"
        "    if path == 'hang':\n"
        "        time.sleep(60)\n"
        "    if path == 'raise':\n"
        "        raise KeyError(path)\n"
    ) + LOOP
    names = ["ok-1", "crash", "ok-2", "hang", "raise", "ok-3"]
    items = [(n, n.split("-")[0] if n.startswith("ok") else n) for n in names]
    got = run_children(script, items, timeout=2)
    assert [got[n]["outcome"] for n in names] == ["OK", "crash", "OK", "crash", "raised", "OK"]
    assert got["hang"]["status"].startswith("hang") and got["crash"]["status"] != 0
    assert got["raise"]["type"] == "builtins.KeyError"


ALLOWED = ("ham_mlx.cache.files.PromptCacheError", "ham_mlx.cache.checks.CacheStateError")


@pytest.mark.parametrize("name", list(BY_NAME))
def test_tampered_file_fails_clearly(tampered, name):
    paths, results = tampered
    v, got = BY_NAME[name], results[name]
    assert got["outcome"] != "crash", f"the child process died: {got}"
    assert got["seconds"] < 5, f"took {got['seconds']:.1f} s"
    if v.ok:
        assert got["outcome"] == "OK", got
        return
    assert got["outcome"] == "raised", "loaded and ran"
    assert got["type"] in ALLOWED, f"{got['type']}: {got['message']}"
    message = got["message"]
    assert Path(paths[name]).name in message, message
    for part in v.names:
        assert part in message, message


MLX_LM_VARIANTS = [
    "L0-HAMCache-count-huge", "L1-GDNCache-ssm-nan", "L2-AttnCache-positions-float",
    "class-KVCache", "class-unknown", "controls-not-json", "controls-deep-lists",
    "controls-threshold-nan", "raw-truncated-data", "raw-header-length-huge",
    "raw-overlapping-data-offsets", "raw-shape-not-matching-bytes",
]  # fmt: skip


def test_mlx_lm_loader_raises_on_tampered_files(tampered):
    """mlx-lm's own load_prompt_cache raises (any exception) on tampered files; never a crash or
    a hang (our state setters check what it hands them)."""
    paths, _ = tampered
    results = run_children(THEIRS + LOOP, [(n, paths[n]) for n in MLX_LM_VARIANTS])
    for name in MLX_LM_VARIANTS:
        got = results[name]
        assert got["outcome"] == "raised", f"{name}: {got}"
        assert got["seconds"] < 5, f"{name}: took {got['seconds']:.1f} s"

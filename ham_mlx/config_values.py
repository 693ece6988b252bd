"""Types and bounds of every configuration value, checked before anything is derived from them
or allocated: a value of the wrong type, NaN or out of range is refused by its key and value."""

from __future__ import annotations

import math
from typing import Any

MAX_LAYERS = 1024
# key: (low, high) for integer fields; None allowed where the field is optional.
INTS = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, MAX_LAYERS),
    "num_heads": (1, 1024), "num_v_heads": (1, 1024), "head_dim": (1, 1 << 12),
    "conv_size": (1, 64), "intermediate_size": (1, 1 << 20), "ham_router_hidden": (0, 1 << 16),
    "bos_token_id": (0, 1 << 22), "eos_token_id": (0, 1 << 22), "pad_token_id": (0, 1 << 22),
}  # fmt: skip
OPTIONAL = {"num_v_heads", "intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id"}
# key: (low, high), both exclusive of NaN and infinities; low itself is excluded.
FLOATS = {"expand_v": (0.0, 64.0), "hidden_ratio": (0.0, 64.0), "norm_eps": (0.0, 1.0)}
BOOLS = ("use_short_conv", "use_gate", "allow_neg_eigval", "tie_word_embeddings")
STRINGS = ("model_type", "output_gate_activation", "hidden_act", "ham_router")
ATTN_INTS = {"num_heads": (1, 1024), "num_kv_heads": (1, 1024), "window_size": (1, 2**31 - 1)}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(values: dict[str, Any], error: type[Exception]) -> None:
    """`values`: the fields of a ModelArgs, as given (before defaults are derived)."""

    def fail(key: str, value: Any, msg: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise error(f"config: {key}={shown}: {msg}")

    for key, (low, high) in INTS.items():
        v = values[key]
        if v is None and key in OPTIONAL:
            continue
        if not is_int(v) or not low <= v <= high:
            fail(key, v, f"must be an integer in [{low}, {high}]")
    for key, (low, high) in FLOATS.items():
        v = values[key]
        if not is_number(v) or not low < v <= high:
            fail(key, v, f"must be a number in ({low:g}, {high:g}]")
    for key in BOOLS:
        if not isinstance(values[key], bool):
            fail(key, values[key], "must be true or false")
    for key in STRINGS:
        if not isinstance(values[key], str):
            fail(key, values[key], "must be a string")
    types = values["layer_types"]
    if types is not None and (
        not isinstance(types, (list, tuple)) or len(types) > MAX_LAYERS
        or not all(isinstance(t, str) for t in types)
    ):  # fmt: skip
        fail("layer_types", types, f"must be a list of at most {MAX_LAYERS} layer type names")
    for key, low, high, what in (("ham_threshold", -math.inf, math.inf, "a finite number"),
                                 ("ham_kv_target", 0.0, 1.0, "a number in [0, 1]")):  # fmt: skip
        v = values[key]
        if v is None and key == "ham_kv_target":
            continue
        items = v if isinstance(v, (list, tuple)) else [v]
        if len(items) > MAX_LAYERS or not all(is_number(x) and low <= x <= high for x in items):
            fail(key, v, f"must be {what}, or a list of them (one per HAM layer)")
    check_attn(values["attn"], fail)


def check_attn(attn: Any, fail) -> None:
    if attn is None:
        return
    if not isinstance(attn, dict):
        fail("attn", attn, "must be an object (num_heads, num_kv_heads, ...) or null")
    for key, (low, high) in ATTN_INTS.items():
        v = attn.get(key)
        if v is not None and (not is_int(v) or not low <= v <= high):
            fail(f"attn.{key}", v, f"must be an integer in [{low}, {high}]")
    theta = attn.get("rope_theta")
    if theta is not None and (not is_number(theta) or theta <= 0):
        fail("attn.rope_theta", theta, "must be a positive number")
    layers = attn.get("layers")
    if layers is not None and (
        not isinstance(layers, list) or len(layers) > MAX_LAYERS
        or not all(is_int(i) and 0 <= i < MAX_LAYERS for i in layers)
    ):  # fmt: skip
        fail("attn.layers", layers, "must be a list of layer indices")

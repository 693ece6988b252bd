"""Prefill tokens/s against length for the two ops HAM adds.

- Gated-delta scan, one layer's shapes: the chunked (WY) scan and the sequential scan of
  `ham_mlx.ops.gated_delta` (both also return the prediction v̂), and `mx.fast.gated_delta_update`
  (MLX's own, which does not return v̂).
- Attention over admitted tokens, one layer, all T queries at once: masked-dense
  (`admitted_attention`: every key, non-admitted ones masked) against admitted-only
  (`compact_attention` over a compact cache holding just the admitted keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.bench.timing import evaluated, median_seconds
from ham_mlx.config import ModelArgs
from ham_mlx.layers.common import l2norm
from ham_mlx.ops.attention import admitted_attention, compact_attention
from ham_mlx.ops.gated_delta import gated_delta_chunked, gated_delta_sequential


def scan_inputs(args: ModelArgs, T: int, seed: int = 0) -> tuple[mx.array, ...]:
    """q (scaled), k, v, g (log decay), beta of one layer for one sequence of T tokens."""
    H, HV, Dk, Dv = args.num_heads, args.num_v_heads, args.head_dim, args.head_v_dim
    mx.random.seed(seed)
    q = l2norm(mx.random.normal((1, T, H, Dk))) * Dk**-0.5
    k = l2norm(mx.random.normal((1, T, H, Dk)))
    v = mx.random.normal((1, T, HV, Dv))
    g = -mx.random.uniform(0.001, 0.1, (1, T, HV))
    beta = mx.sigmoid(mx.random.normal((1, T, HV)))
    mx.eval(q, k, v, g, beta)
    return q, k, v, g, beta


SCANS: dict[str, Callable[..., Any]] = {
    "chunked scan": lambda q, k, v, g, b: gated_delta_chunked(q, k, v, g, b),
    "sequential scan": lambda q, k, v, g, b: gated_delta_sequential(q, k, v, g, b),
    "mx.fast.gated_delta_update": lambda q, k, v, g, b: mx.fast.gated_delta_update(
        q, k, v, mx.exp(g), b
    ),
}


def run_scan(
    args: ModelArgs, lengths: list[int], repeats: int, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    rows = []
    for T in lengths:
        inputs = scan_inputs(args, T)
        for name, fn in SCANS.items():
            sec, samples = median_seconds(evaluated(lambda fn=fn, x=inputs: fn(*x)), repeats)
            rows.append(
                {"op": "scan", "method": name, "T": T, "tok_s": T / sec, "ms": 1e3 * sec,
                 "samples_ms": [1e3 * s for s in samples]}
            )  # fmt: skip
            log(f"  {name:<28} T={T:>6}: {T / sec:10.1f} tok/s ({1e3 * sec:9.2f} ms)")
    return rows


def attention_inputs(args: ModelArgs, T: int, fraction: float, seed: int = 0) -> dict[str, Any]:
    HV, Dk, Dv = args.num_v_heads, args.head_dim, args.head_v_dim
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    q = l2norm(mx.random.normal((1, HV, T, Dk)))
    k = l2norm(mx.random.normal((1, HV, T, Dk)))
    v = mx.random.normal((1, HV, T, Dv))
    n = max(1, round(fraction * T))
    idx = np.sort(rng.choice(T, size=n, replace=False))
    admitted = np.zeros((1, T), dtype=bool)
    admitted[0, idx] = True
    idx_mx = mx.array(idx, dtype=mx.int32)
    out = {
        "q": q, "k": k, "v": v, "admitted": mx.array(admitted),
        "keys": mx.contiguous(k[:, :, idx_mx]), "values": mx.contiguous(v[:, :, idx_mx]),
        "counts": mx.array([n], dtype=mx.int32), "key_positions": idx_mx[None],
        "query_positions": mx.arange(T, dtype=mx.int32),
        "log_scale": mx.full((HV,), float(np.log(np.sqrt(Dk)))), "sink": mx.zeros((HV,)),
    }  # fmt: skip
    mx.eval(list(out.values()))
    return out


def run_attention(
    args: ModelArgs,
    lengths: list[int],
    fractions: list[float],
    repeats: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    rows = []
    for T in lengths:
        for f in fractions:
            a = attention_inputs(args, T, f)
            methods = {
                "masked-dense": lambda a=a: admitted_attention(
                    a["q"], a["k"], a["v"], a["admitted"], a["log_scale"], a["sink"]
                ),
                "admitted-only": lambda a=a: compact_attention(
                    a["q"],
                    a["keys"],
                    a["values"],
                    a["counts"],
                    a["key_positions"],
                    a["query_positions"],
                    a["log_scale"],
                    a["sink"],
                ),  # fmt: skip
            }
            for name, fn in methods.items():
                sec, samples = median_seconds(evaluated(fn), repeats)
                rows.append({"op": "attention", "method": name, "T": T, "fraction": f,
                             "tok_s": T / sec, "ms": 1e3 * sec,
                             "samples_ms": [1e3 * s for s in samples]})  # fmt: skip
                log(f"  {name:<14} T={T:>6} cached {f:.0%}: {T / sec:10.1f} tok/s")
    return rows

"""Memory statistics of a model's caches, per layer."""

from __future__ import annotations

from typing import Any

from ham_mlx.cache.attention import AttnCache
from ham_mlx.cache.ham import HAMCache


def kv_stats(cache: list[Any]) -> list[dict[str, Any]]:
    """One dict per layer: type, admitted (per row), seen (the longest row), kv_fraction (per
    row), kv_bytes, full_kv_bytes (a cache holding every token), state_bytes (the RNN's)."""
    stats = []
    for c in cache:
        seen_rows = [] if c.offsets is None else [int(o) for o in c.offsets]
        if isinstance(c, (HAMCache, AttnCache)):
            kind = "ham" if isinstance(c, HAMCache) else "attn"
            admitted = c.admitted_counts() if kind == "ham" else [int(n) for n in c.window_counts()]
            if c.buffer.entries is None:
                admitted = [0] * len(seen_rows) if kind == "ham" else admitted
            per_token = 0
            if c.buffer.entries is not None:
                e = c.buffer.entries
                per_token = e.keys.shape[1] * e.keys.shape[3] * e.keys.itemsize
                per_token += e.values.shape[1] * e.values.shape[3] * e.values.itemsize
            kv_bytes = sum(admitted) * per_token
            full = sum(seen_rows) * per_token
        else:
            kind, admitted, kv_bytes, full = "gdn", [], 0, 0
        fraction = [a / s if s else 0.0 for a, s in zip(admitted, seen_rows)]
        ssm, conv = getattr(c, "ssm", None), getattr(c, "conv", None)
        state_bytes = 0 if ssm is None else ssm.nbytes + (conv.nbytes if conv is not None else 0)
        stats.append({
            "type": kind, "admitted": admitted, "seen": c.offset, "kv_fraction": fraction,
            "kv_bytes": kv_bytes, "full_kv_bytes": full, "state_bytes": state_bytes,
        })  # fmt: skip
    return stats

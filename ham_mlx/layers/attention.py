"""FLA's softmax attention: GQA, NeoX (half-split) RoPE, optional sliding window (spec §5)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.cache import AttnCache
from ham_mlx.config import ModelArgs
from ham_mlx.layers.common import check_cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        cfg = args.attn
        D = args.hidden_size
        self.num_heads, self.num_kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
        self.head_dim = D // self.num_heads
        self.window = cfg["window_size"]
        hd = self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)
        self.rope = nn.RoPE(hd, traditional=False, base=float(cfg["rope_theta"]))

    def cache_mismatch(self, cache: AttnCache) -> str | None:
        """Why a cache does not fit this layer (None if it does)."""
        if cache.window != self.window:
            return f"window {cache.window}, expected {self.window}"
        if cache.keys is not None:
            want = (self.num_kv_heads, self.head_dim)
            got = (cache.keys.shape[1], cache.keys.shape[3])
            if got != want or cache.values.shape[3] != self.head_dim:
                return f"key (heads, head size) {got}, expected {want}"
        return None

    def __call__(self, x: mx.array, cache: AttnCache | None = None) -> mx.array:
        B, L, _ = x.shape
        hd = self.head_dim
        check_cache(cache, AttnCache, "attn")
        q = self.q_proj(x).reshape(B, L, self.num_heads, hd).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
        if cache is None:
            q, k = self.rope(q), self.rope(k)  # [B, N, L, hd]
            mask = self.causal_mask(mx.arange(L)[None], mx.arange(L)[None], None, L)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask=mask)
            return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        rows = cache.call_rows(B, L)
        start = rows.offsets - rows.start  # RoPE position of each row's first token
        aligned = cache.aligned(rows)
        offset = int(start[0]) if aligned else mx.array(start.astype("int32"))
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        entries, count = cache.store(k, v, rows)
        if aligned and self.window is None:  # slot = position in every row
            mask = None if L == 1 else "causal"
        else:
            mask = self.causal_mask(rows.positions(L), entries.positions, count, L)
        cache.advance(rows, L)
        o = mx.fast.scaled_dot_product_attention(
            q, entries.keys, entries.values, scale=hd**-0.5, mask=mask
        )
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def causal_mask(self, q_pos: mx.array, k_pos: mx.array, count: mx.array | None, L: int):
        """[B, 1, L, n] bool: query i may read key j iff j is a stored entry (j < count), its
        position is not after the query's, and (with a window W) within the last W positions.
        q_pos [B, L], k_pos [B, n] positions; count [B] (None: every key is stored)."""
        if self.window is None and count is None:
            return None if L == 1 else "causal"
        mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, L, n]
        if self.window is not None:
            mask = mask & (k_pos[:, None, :] > q_pos[:, :, None] - self.window)
        if count is not None:
            mask = mask & (mx.arange(k_pos.shape[1])[None, None, :] < count[:, None, None])
        return mask[:, None]

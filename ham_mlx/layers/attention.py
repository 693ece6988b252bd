"""Softmax attention: GQA, NeoX (half-split) RoPE, optional sliding window (spec §5), and the
gated variant (spec §5.1): q/k RMSNorm, partial RoPE, a head size of its own, a sigmoid output
gate read from q_proj beside each query head."""

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
        self.head_dim = cfg.get("head_dim") or D // self.num_heads
        self.window = cfg["window_size"]
        self.gated = cfg.get("output_gate") == "sigmoid"
        hd = self.head_dim
        # gated: q_proj rows are per head [query (hd) | gate (hd)], heads outermost
        self.q_proj = nn.Linear(D, self.num_heads * hd * (2 if self.gated else 1), bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)
        if cfg.get("qk_norm"):
            self.q_norm = nn.RMSNorm(hd, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        rotary = int(hd * cfg.get("partial_rotary_factor", 1.0))
        self.rope = nn.RoPE(rotary, traditional=False, base=float(cfg["rope_theta"]))

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
        q, gate = self.query(x)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, hd)
        if "k_norm" in self:
            k = self.k_norm(k)
        k = k.transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
        if cache is None:
            q, k = self.rope(q), self.rope(k)  # [B, N, L, hd]
            mask = self.causal_mask(mx.arange(L)[None], mx.arange(L)[None], None, L)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask=mask)
            return self.output(o, gate)
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
        return self.output(o, gate)

    def query(self, x: mx.array) -> tuple[mx.array, mx.array | None]:
        """Queries [B, N, L, hd] (q-normed when qk_norm) and the output gate's logits
        [B, L, N*hd] (None without a gate), from x [B, L, D]."""
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1)
        gate = None
        if self.gated:
            q, gate = q[..., :hd], q[..., hd:].reshape(B, L, -1)
        if "q_norm" in self:
            q = self.q_norm(q)
        return q.transpose(0, 2, 1, 3), gate

    def output(self, o: mx.array, gate: mx.array | None) -> mx.array:
        """o_proj(o · sigmoid(gate)) for o [B, N, L, hd] -> [B, L, D]."""
        B, _, L, _ = o.shape
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if gate is not None:
            o = o * mx.sigmoid(gate)
        return self.o_proj(o)

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

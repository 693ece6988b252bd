"""FLA's softmax attention: GQA, NeoX (half-split) RoPE, optional sliding window (spec §5)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.cache import AttnCache
from ham_mlx.config import ModelArgs


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

    def __call__(self, x: mx.array, cache: AttnCache | None = None) -> mx.array:
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(B, L, self.num_heads, hd).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)  # [B, N, L, hd]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        Tk = k.shape[2]
        if self.window is None:  # the last L keys are the queries' own tokens
            mask = None if L == 1 else "causal"
        else:
            q_pos = mx.arange(offset, offset + L)[:, None]
            k_pos = mx.arange(offset + L - Tk, offset + L)[None, :]
            mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)  # [L, Tk]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

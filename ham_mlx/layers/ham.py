"""The HAM mixer: GDN branch + surprise router + attention over admitted tokens (spec §4)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.cache import HAMCache
from ham_mlx.config import ModelArgs
from ham_mlx.layers.gdn import GatedDeltaNet
from ham_mlx.ops.attention import admitted_attention, cached_admitted_attention, gated_output

EPS = 1e-6


def head_surprise(v_hat: mx.array, v: mx.array, router: str) -> mx.array:
    """e_t^j per token and value head [B, L, HV] from v_hat, v [B, L, HV, Dv] (spec §4.1)."""
    v = v.astype(mx.float32)
    if router == "cosine":
        dot = mx.sum(v_hat * v, axis=-1)
        norms = (mx.sum(v_hat * v_hat, axis=-1) + EPS) * (mx.sum(v * v, axis=-1) + EPS)
        return 1.0 - dot * mx.rsqrt(norms)
    err = v - v_hat
    return mx.sum(err * err, axis=-1) / (mx.sum(v * v, axis=-1) + EPS)  # l2


class Router(nn.Module):
    """Learned router: r_t = sigmoid(w2ᵀ SiLU(W1 h_t) + b2)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=True)

    def __call__(self, h: mx.array) -> mx.array:
        return mx.sigmoid(self.fc2(nn.silu(self.fc1(h)))[..., 0].astype(mx.float32))  # [B, L]


class HAMAttention(GatedDeltaNet):
    def __init__(self, args: ModelArgs, threshold: float):
        super().__init__(args)
        D, HV, Dk, Dv = args.hidden_size, args.num_v_heads, args.head_dim, args.head_v_dim
        self.router_kind = args.ham_router
        self.kv_gate_proj = nn.Linear(D, HV, bias=False)
        self.kv_norm = nn.RMSNorm(Dv, eps=args.norm_eps)
        self.attn_log_scale = mx.full((HV,), math.log(math.sqrt(Dk)))
        self.attn_sink = mx.zeros((HV,))
        self.threshold = mx.array(threshold, dtype=mx.float32)  # non-trainable buffer
        if self.router_kind == "learned":
            self.router = Router(D, args.ham_router_hidden)
        self.freeze(recurse=False, keys=["threshold"])

    def surprise(self, x: mx.array, v: mx.array, v_hat: mx.array) -> mx.array:
        """Token score s_t [B, L] float32: min over value heads, or the learned router's r_t."""
        if self.router_kind == "learned":
            return self.router(x)
        return mx.stop_gradient(mx.min(head_surprise(v_hat, v, self.router_kind), axis=-1))

    def __call__(
        self, x: mx.array, cache: HAMCache | None = None, scores: list | None = None
    ) -> mx.array:
        B, L, _ = x.shape
        H, HV = self.num_heads, self.num_v_heads
        if cache is not None:
            cache.settle()
        rec = self.recurrence(x, cache)
        score = self.surprise(x, rec.v, rec.v_hat)  # [B, L]
        if scores is not None:
            scores.append(score)
        tau = None if cache is None else cache.threshold_override(score)
        admitted = score >= (self.threshold if tau is None else tau)  # [B, L]
        if cache is not None:
            admitted = cache.limit(admitted)

        q = rec.q.transpose(0, 2, 1, 3)  # [B, H, L, Dk]
        k = rec.k.transpose(0, 2, 1, 3)  # [B, H, L, Dk]
        v = rec.v.transpose(0, 2, 1, 3)  # [B, HV, L, Dv]
        gate = self.kv_gate_proj(x)  # [B, L, HV]
        learned = self.router_kind == "learned"
        if cache is None:  # training / one-shot forward: masked attention over the sequence
            key_bias = mx.log(mx.maximum(score, EPS)) if learned else None  # router's gradient
            if HV != H:
                q, k = mx.repeat(q, HV // H, axis=1), mx.repeat(k, HV // H, axis=1)
            o_kv = admitted_attention(
                q, k, v, admitted, self.attn_log_scale, self.attn_sink, key_bias
            )  # [B, HV, L, Dv]
            kv_out = gated_output(o_kv, gate, self.kv_norm.weight, self.norm_eps)
        else:  # store the admitted tokens, then attend over the compact cache only
            q_pos = mx.arange(cache.offset, cache.offset + L)
            cache.append(k, v, mx.stop_gradient(score), admitted)
            keys, values, scores, positions, count = cache.fetch()
            key_bias = mx.log(mx.maximum(scores, EPS)) if learned else None
            kv_out = cached_admitted_attention(
                q, keys, values, count, positions, q_pos, self.attn_log_scale, self.attn_sink,
                key_bias, gate, self.kv_norm.weight, self.norm_eps,
            )  # fmt: skip
        y = self.rnn_output(x, rec.o) + kv_out  # [B, L, HV, Dv]
        return self.o_proj(y.astype(x.dtype).reshape(B, L, -1))

"""The HAM mixer: GDN branch + surprise router + attention over admitted tokens (spec §4)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.cache import HAMCache
from ham_mlx.config import ModelArgs
from ham_mlx.layers.common import maybe_compiled
from ham_mlx.layers.gdn import GatedDeltaNet, decode_recurrence
from ham_mlx.ops.attention import (
    admitted_attention,
    buffer_attention,
    cached_admitted_attention,
    gated_output,
)

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


def router_score(p: dict, h: mx.array) -> mx.array:
    """`Router.__call__` from its (unquantized) parameters p, for the decode step: r_t [B, L]
    float32 from h [B, L, D]."""
    hidden = nn.silu(h @ p["fc1"]["weight"].T)
    logit = mx.addmm(p["fc2"]["bias"], hidden, p["fc2"]["weight"].T)
    return mx.sigmoid(logit[..., 0].astype(mx.float32))


SLOT_BUCKET = 32
_SLOTS: dict[int, mx.array] = {}


def attended_slots(n: int, alloc: int) -> mx.array:
    """An array [m] whose length m >= n is the number of buffer slots the decode step attends:
    n rounded up to SLOT_BUCKET (at most alloc), so that the compiled step retraces (a few ms, no
    new C++) once per bucket rather than once per admitted token."""
    m = min(alloc, -(-n // SLOT_BUCKET) * SLOT_BUCKET)
    if m not in _SLOTS:
        _SLOTS[m] = mx.zeros((m,), dtype=mx.int32)
    return _SLOTS[m]


def decode_step(p, x, conv, S, keys, values, positions, scores, count, offset, tau, cap, scratch,
                slots, cfg):  # fmt: skip
    """One token through a HAM layer with a cache, as a pure fixed-shape function (the fast
    decode path; the general path in `HAMAttention.__call__` is its twin).

    p: the layer's weights (`step_params`); x [B, 1, D]; conv, S: the GDN cache; keys, values,
    positions, scores: the HAMCache buffers (length n, room for this token and the scratch slot
    already made), count [B]; offset: int32 scalar, this token's position; tau: scalar or [B, 1];
    cap: int32 scalar (the `reject` policy's max_kv_tokens); scratch: int32 scalar, the last slot
    (an input, not a constant: CPU compile bakes constants into the C++ it builds, and a new
    buffer length would then compile anew); slots [m]: attention reads the first m slots only
    (m >= every row's count after this token; its shape, not its values, matters).
    cfg: (StepConfig, router, reject).
    Returns y [B, 1, D], the new conv, S, buffers and count, and score, admitted [B, 1].
    """
    gdn, router, reject = cfg
    B, HV = x.shape[0], gdn.HV
    q, k, v, v_hat, o, gate, small, conv, S = decode_recurrence(p, x, conv, S, gdn)
    if router == "learned":
        score = router_score(p["router"], x)  # [B, 1]
    elif router == "cosine":  # head_surprise's formula, its three sums as one reduction
        X = mx.stack([v_hat, v.astype(mx.float32)])  # [2, B, HV, Dv]
        G = mx.sum(X[:, None] * X[None], axis=-1).reshape(4, B, HV)  # Gram entries per head
        e = 1.0 - G[1:2] * mx.rsqrt((G[0:1] + EPS) * (G[3:4] + EPS))  # [1, B, HV]
        score = mx.min(e.reshape(B, HV), axis=-1, keepdims=True)  # [B, 1]
    else:
        score = mx.min(head_surprise(v_hat[:, None], v[:, None], router), axis=-1)  # [B, 1]
    admitted = score >= tau
    if reject:
        admitted = admitted & (count[:, None] + 1 <= cap)
    a = admitted.astype(mx.int32)
    slot = mx.where(admitted, count[:, None], scratch)  # [B, 1]
    keys = mx.put_along_axis(keys, slot[:, None, :, None], k[:, :, None, :], axis=2)
    values = mx.put_along_axis(values, slot[:, None, :, None], v[:, :, None, :], axis=2)
    positions = mx.put_along_axis(positions, slot, mx.broadcast_to(offset, (B, 1)), axis=1)
    scores = mx.put_along_axis(scores, slot, score, axis=1)
    count = count + a[:, 0]
    m = slots.shape[0]
    key_bias = mx.log(mx.maximum(scores[:, :m], EPS)) if router == "learned" else None
    o_kv = buffer_attention(
        q, keys[:, :, :m], values[:, :, :m], count, p["attn_log_scale"], p["attn_sink"], key_bias
    )  # [B, HV, Dv]
    # Both branches' RMSNorms (spec §3 step 8, §4.4) in one pass over [o; o_kv].
    X = mx.stack([o, o_kv.astype(mx.float32)])  # [2, B, HV, Dv]
    X = X * mx.rsqrt(mx.mean(mx.square(X), axis=-1, keepdims=True) + gdn.norm_eps)
    r = X[0:1].squeeze(0) * p["o_norm"].astype(mx.float32)  # (slices: X[0] would gather)
    if gate is not None:
        r = r * (mx.sigmoid(gate) if gdn.gate_activation == "sigmoid" else nn.silu(gate))
    kv_gate = mx.sigmoid(small[:, 2 * HV :])[..., None]  # [B, HV, 1]
    y = r + kv_gate * (X[1:2].squeeze(0) * p["kv_norm"].astype(mx.float32))  # [B, HV, Dv]
    y = y.astype(x.dtype).reshape(B, 1, -1) @ p["o_proj"].T
    return y, conv, S, keys, values, positions, scores, count, score, admitted


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

    # ---- one-token decode fast path ---------------------------------------------------------
    def small_projections(self) -> list[mx.array]:
        return super().small_projections() + [self["kv_gate_proj"]["weight"]]

    def step_linears(self) -> list[nn.Module]:
        router = [self.router.fc1, self.router.fc2] if self.router_kind == "learned" else []
        return super().step_linears() + [self["kv_gate_proj"], *router]

    def step_params(self) -> dict:
        p = super().step_params()
        p.update(
            kv_norm=self["kv_norm"]["weight"], attn_log_scale=self["attn_log_scale"],
            attn_sink=self["attn_sink"],
        )  # fmt: skip
        if self.router_kind == "learned":
            p["router"] = self.router.parameters()
        return p

    def decode(self, x: mx.array, cache: HAMCache, scores: list | None) -> mx.array:
        """One token through the compiled `decode_step`; updates the cache as `append` does."""
        B = x.shape[0]
        tau = cache.threshold_override(None)  # no score needed once the budget has observed
        if tau is None:
            tau = self.threshold
        elif not isinstance(tau, mx.array):
            tau = mx.array(tau, dtype=mx.float32)
        reject = cache.max_kv_tokens is not None and cache.kv_policy == "reject"
        cap = mx.array(cache.max_kv_tokens if reject else 0, dtype=mx.int32)
        H, HV, Dk, Dv = self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim
        scratch = mx.array(cache.reserve(B, H, Dk, HV, Dv, x.dtype, 1) - 1, dtype=mx.int32)
        conv, S = self.decode_state(x, cache)
        slots = attended_slots(cache.bound + 1, cache.keys.shape[2])
        cfg = (self.step_config(), self.router_kind, reject)
        step = maybe_compiled(lambda *a: decode_step(*a, cfg), ("ham", cfg))
        y, cache.conv, cache.ssm, *buffers, score, admitted = step(
            self.step_params(), x, conv, S, cache.keys, cache.values, cache.positions,
            cache.scores, cache.count, mx.array(cache.offset, dtype=mx.int32), tau, cap, scratch,
            slots,
        )  # fmt: skip
        cache.commit(*buffers, score, admitted)
        if scores is not None:
            scores.append(score)
        return y

    def __call__(
        self, x: mx.array, cache: HAMCache | None = None, scores: list | None = None
    ) -> mx.array:
        B, L, _ = x.shape
        H, HV = self.num_heads, self.num_v_heads
        if cache is not None:
            cache.settle()
        if self.fast_decode(x, cache) and (cache.budget is None or cache.budget.recent is not None):
            return self.decode(x, cache, scores)
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

"""The Gated DeltaNet mixer, exactly as FLA 0.6.0 computes it (spec §3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.cache import GDNCache
from ham_mlx.config import ModelArgs
from ham_mlx.layers.common import causal_short_conv, gated_rms_norm, l2norm
from ham_mlx.ops.gated_delta import gated_delta


class Recurrence(NamedTuple):
    """What the GDN branch computes for L new tokens."""

    q: mx.array  # [B, L, H, Dk]   l2-normalised, before the Dk^-0.5 scale
    k: mx.array  # [B, L, H, Dk]   l2-normalised
    v: mx.array  # [B, L, HV, Dv]  after conv + SiLU
    o: mx.array  # [B, L, HV, Dv]  S_t q_t, float32
    v_hat: mx.array  # [B, L, HV, Dv]  the RNN's prediction of v_t, float32


def init_decay_params(n: int) -> tuple[mx.array, mx.array]:
    """A_log, dt_bias as FLA initialises them (A ~ U(1, 16) here; dt log-uniform in [1e-3, 0.1],
    dt_bias = softplus^-1(dt))."""
    A = mx.random.uniform(1.0, 16.0, (n,))
    dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(0.1), (n,)))
    dt = mx.maximum(dt, 1e-4)
    return mx.log(A), dt + mx.log(-mx.expm1(-dt))


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, HV = args.hidden_size, args.num_heads, args.num_v_heads
        Dk, Dv, Kc = args.head_dim, args.head_v_dim, args.conv_size
        self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim = H, HV, Dk, Dv
        self.allow_neg_eigval = args.allow_neg_eigval
        self.use_gate = args.use_gate
        self.gate_activation = args.output_gate_activation
        self.norm_eps = args.norm_eps
        self.q_proj = nn.Linear(D, H * Dk, bias=False)
        self.k_proj = nn.Linear(D, H * Dk, bias=False)
        self.v_proj = nn.Linear(D, HV * Dv, bias=False)
        self.a_proj = nn.Linear(D, HV, bias=False)
        self.b_proj = nn.Linear(D, HV, bias=False)
        if self.use_gate:
            self.g_proj = nn.Linear(D, HV * Dv, bias=False)
        # Depthwise convs; MLX weight layout [C, Kc, 1] (torch's is [C, 1, Kc]).
        self.q_conv1d = nn.Conv1d(H * Dk, H * Dk, Kc, groups=H * Dk, bias=False)
        self.k_conv1d = nn.Conv1d(H * Dk, H * Dk, Kc, groups=H * Dk, bias=False)
        self.v_conv1d = nn.Conv1d(HV * Dv, HV * Dv, Kc, groups=HV * Dv, bias=False)
        self.A_log, self.dt_bias = init_decay_params(HV)
        self.o_norm = nn.RMSNorm(Dv, eps=args.norm_eps)
        self.o_proj = nn.Linear(HV * Dv, D, bias=False)

    def recurrence(self, x: mx.array, cache: GDNCache | None) -> Recurrence:
        """Projections, short conv, decay/beta and the delta-rule scan for x [B, L, D].

        Updates cache.conv and cache.ssm (not cache.offset).
        """
        B, L, _ = x.shape
        H, HV, Dk, Dv = self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim
        qkv = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        w = mx.concatenate([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
        qkv, conv_state = causal_short_conv(qkv, w, cache.conv if cache is not None else None)
        q, k, v = mx.split(qkv, [H * Dk, 2 * H * Dk], axis=-1)
        q = l2norm(q.reshape(B, L, H, Dk))
        k = l2norm(k.reshape(B, L, H, Dk))
        v = v.reshape(B, L, HV, Dv)
        a = self.a_proj(x).astype(mx.float32)  # [B, L, HV]
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(
            a + self.dt_bias.astype(mx.float32)
        )
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        state = cache.ssm if cache is not None else None
        o, v_hat, state = gated_delta(q * Dk**-0.5, k, v, g, beta, state)
        if cache is not None:
            cache.conv, cache.ssm = conv_state, state
        return Recurrence(q, k, v, o, v_hat)

    def rnn_output(self, x: mx.array, o: mx.array) -> mx.array:
        """r_t = RMSNorm(o_t) * w_onorm * act(gate_t): [B, L, HV, Dv] float32 (spec §3 step 8)."""
        B, L, _ = x.shape
        gate = None
        if self.use_gate:
            gate = self.g_proj(x).reshape(B, L, self.num_v_heads, self.head_v_dim)
            gate = gate.astype(mx.float32)
        weight = self.o_norm.weight.astype(mx.float32)
        return gated_rms_norm(o, gate, weight, self.norm_eps, self.gate_activation)

    def __call__(self, x: mx.array, cache: GDNCache | None = None) -> mx.array:
        B, L, _ = x.shape
        rec = self.recurrence(x, cache)
        if cache is not None:
            cache.offset += L
        r = self.rnn_output(x, rec.o)
        return self.o_proj(r.astype(x.dtype).reshape(B, L, -1))

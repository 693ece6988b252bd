"""The Gated DeltaNet mixer, exactly as FLA 0.6.0 computes it (spec §3)."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ham_mlx import kernels
from ham_mlx.cache import GDNCache
from ham_mlx.cache.recurrent import RecurrentState
from ham_mlx.cache.rows import CallRows
from ham_mlx.config import ModelArgs
from ham_mlx.layers import common
from ham_mlx.layers.common import (
    DecodePlan,
    causal_short_conv,
    check_cache,
    gated_rms_norm,
    l2norm,
    run_plan,
)
from ham_mlx.ops import mlx_ext
from ham_mlx.ops.cpu_scan import OutputNorm, gated_delta_c
from ham_mlx.ops.gated_delta import chunk_size_for, gated_delta, gated_delta_step, runs_c_scan


class Recurrence(NamedTuple):
    """What the GDN branch computes for L new tokens."""

    q: mx.array  # [B, L, H, Dk]   l2-normalised, before the Dk^-0.5 scale
    k: mx.array  # [B, L, H, Dk]   l2-normalised
    v: mx.array  # [B, L, HV, Dv]  after conv + SiLU
    o: mx.array | None  # [B, L, HV, Dv]  S_t q_t, float32 (None: the scan gave r instead)
    v_hat: mx.array  # [B, L, HV, Dv]  the RNN's prediction of v_t, float32
    gate: mx.array | None  # [B, L, HV, Dv] the output gate's logits, float32 (None: no gate)
    small: mx.array  # [B, L, n] float32: the a | b (| kv_gate) projections
    r: mx.array | None = None  # [B, L, HV, Dv] the RNN output (`rnn_output`), where the C scan
    # computed it from o as it wrote o


class StepConfig(NamedTuple):
    """The static part of a layer that its branch function closes over."""

    H: int
    HV: int
    Dk: int
    Dv: int
    allow_neg_eigval: bool
    use_gate: bool
    gate_activation: str
    norm_eps: float


def decay_and_beta(a, b, A_log, dt_bias, allow_neg_eigval: bool) -> tuple[mx.array, mx.array]:
    """g = -exp(A_log) · softplus(a + dt_bias) (log decay) and β = sigmoid(b) (2·sigmoid(b) with
    negative eigenvalues), float32, from the a/b projections [..., HV] (spec §3 steps 5-6)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias.astype(mx.float32))
    beta = mx.sigmoid(b)
    return g, (2.0 * beta if allow_neg_eigval else beta)


def linear(w, x: mx.array) -> mx.array:
    """x @ wᵀ for a weight array; a module (a quantized linear) is called instead."""
    return x @ w.T if isinstance(w, mx.array) else w(x)


def gdn_branch(
    p: dict,
    x,
    conv,
    S,
    cfg: StepConfig,
    valid=None,
    ends=None,
    one_step=False,
    cached=False,
    with_v_hat=True,
    ext_threads=None,
):
    """The GDN branch of a layer for x [B, L, D] (spec §3 steps 1-7), as a pure function: the
    general path calls it, and the one-token decode step calls it compiled (`one_step`: L = 1,
    the scan as `gated_delta_step`, two passes over the state).

    p: the layer's weights (`branch_params`: projection weights or modules, "conv" [C, Kc, 1]
    the q|k|v conv weights, "small" the a|b(|kv_gate) projections stacked); conv [B, Kc-1, C]
    or None (zeros); S [B, HV, Dv, Dk] or None; valid [B, L] bool and ends [B]: the real tokens
    (padding leaves the conv inputs and the state as they were: zeroed inputs, decay 1, beta 0).
    cached: a cached call (generation), which no gradient goes through (see `gated_delta`);
    without with_v_hat such a call may leave Recurrence.v_hat None (a GDN layer reads o only).
    ext_threads: with one_step, the scan step as the MLX extension's `gdn_step` on up to that
    many threads (None: MLX's operations, `gated_delta_step`).
    Returns (Recurrence, the new conv inputs, the new state).
    """
    B, L, _ = x.shape
    H, HV, Dk, Dv = cfg.H, cfg.HV, cfg.Dk, cfg.Dv
    qkv, gate, small = input_projections(p, x, cfg)
    if valid is not None:
        qkv = mx.where(valid[..., None], qkv, 0)
    qkv, conv = causal_short_conv(qkv, p["conv"], conv, ends, cached)  # [B, L, C]
    qk, v = mx.split(qkv, [2 * H * Dk], axis=-1)
    qk = l2norm(qk.reshape(B, L, 2 * H, Dk))  # q and k heads in one pass
    q, k = qk[:, :, :H], qk[:, :, H:]
    v = v.reshape(B, L, HV, Dv)
    small = small.astype(mx.float32)  # [B, L, n]: a | b | ...
    g, beta = decay_and_beta(small[..., :HV], small[..., HV : 2 * HV], p["A_log"], p["dt_bias"],
                             cfg.allow_neg_eigval)  # fmt: skip
    if valid is not None:  # padded steps: S <- 1 * S + 0
        g = mx.where(valid[..., None], g, 0.0)
        beta = mx.where(valid[..., None], beta, 0.0)
    gate = gate_heads(gate, cfg, B, L)
    if one_step and ext_threads is not None:  # q, k, v, g, beta as the step holds them
        o, v_hat, S = mlx_ext.module().gdn_step(S, q, k, v, g, beta, ext_threads)
        return Recurrence(q, k, v, o, v_hat, gate, small), conv, S
    if one_step:
        qs, ks = (q[:, 0] * Dk**-0.5).astype(mx.float32), k[:, 0].astype(mx.float32)
        if HV != H:  # value head j reads q/k head j // (HV // H)
            qs, ks = mx.repeat(qs, HV // H, axis=1), mx.repeat(ks, HV // H, axis=1)
        o, v_hat, S = gated_delta_step(qs, ks, v[:, 0].astype(mx.float32), g[:, 0], beta[:, 0],
                                       S.astype(mx.float32))  # fmt: skip
        o, v_hat = o[:, None], v_hat[:, None]
        return Recurrence(q, k, v, o, v_hat, gate, small), conv, S
    if runs_c_scan(L, cached):  # the scan also applies the output norm as it writes o
        norm = OutputNorm(gate, p["o_norm"], cfg.norm_eps, cfg.gate_activation)
        r, v_hat, S = gated_delta_c(q * Dk**-0.5, k, v, g, beta, S, chunk_size_for(L),
                                    with_v_hat, norm)  # fmt: skip
        return Recurrence(q, k, v, None, v_hat, gate, small, r), conv, S
    o, v_hat, S = gated_delta(q * Dk**-0.5, k, v, g, beta, S, cached, with_v_hat)
    return Recurrence(q, k, v, o, v_hat, gate, small), conv, S


def gate_heads(gate: mx.array | None, cfg: StepConfig, B: int, L: int) -> mx.array | None:
    """The output gate's logits as [B, L, HV, Dv] float32 (None without a gate)."""
    return None if gate is None else gate.reshape(B, L, cfg.HV, cfg.Dv).astype(mx.float32)


def input_projections(p: dict, x: mx.array, cfg: StepConfig) -> tuple[mx.array, ...]:
    """q|k|v [B, L, C], the output gate's logits [B, L, HV*Dv] (None without a gate) and the
    small projections [B, L, n] of x [B, L, D]: one product by p["in_proj"] (the decode step's
    stacked weight) or one per projection."""
    if "in_proj" in p:
        C = 2 * cfg.H * cfg.Dk + cfg.HV * cfg.Dv
        proj = linear(p["in_proj"], x)
        if not cfg.use_gate:
            return proj[..., :C], None, proj[..., C:]
        G = cfg.HV * cfg.Dv
        return proj[..., :C], proj[..., C : C + G], proj[..., C + G :]
    qkv = mx.concatenate([linear(p[n], x) for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
    gate = linear(p["g_proj"], x) if cfg.use_gate else None
    return qkv, gate, linear(p["small"], x)


def gdn_decode_step(p: dict, x, conv, S, cfg: StepConfig, threads=None) -> tuple[mx.array, ...]:
    """One token through a GDN mixer (`gdn_branch` + output), a pure function: (y, conv, S);
    threads: the scan step on the MLX extension (see `gdn_branch`'s ext_threads)."""
    rec, conv, S = gdn_branch(p, x, conv, S, cfg, one_step=True, ext_threads=threads)
    r = rnn_output(rec, p, cfg).astype(x.dtype)  # [B, 1, HV, Dv]
    return linear(p["o_proj"], r.reshape(*x.shape[:2], -1)), conv, S


def rnn_output(rec: Recurrence, p: dict, cfg: StepConfig) -> mx.array:
    """r_t = RMSNorm(o_t) * w_onorm * act(gate_t): [B, L, HV, Dv] float32 (spec §3 step 8)."""
    if rec.r is not None:
        return rec.r
    weight = p["o_norm"].astype(mx.float32)
    return gated_rms_norm(rec.o, rec.gate, weight, cfg.norm_eps, cfg.gate_activation)


class Stacked:
    """Several linear modules applied as one: their outputs concatenated (quantized layers)."""

    def __init__(self, modules: list) -> None:
        self.modules = modules

    def __call__(self, x: mx.array) -> mx.array:
        return mx.concatenate([m(x) for m in self.modules], axis=-1)


class Derived:
    """An array derived from parameters (a concatenation) for the decode step, rebuilt whenever
    one of them is replaced (MLX arrays are immutable: an update is a new array). Held as a plain
    attribute, so it is not a parameter."""

    def __init__(self) -> None:
        self.sources: tuple[mx.array, ...] = ()
        self.value: mx.array | None = None

    def get(self, sources: list[mx.array]) -> mx.array:
        same = len(sources) == len(self.sources)
        if not (same and all(a is b for a, b in zip(sources, self.sources))):
            self.sources, self.value = tuple(sources), mx.concatenate(sources)
        return self.value


class SharedStack:
    """The weights [n_i, D] of several linear modules stacked as one [sum n_i, D] array, which
    the modules' own weights then view (row slices share its memory: no copy is kept), so that
    one product computes all of them. Rebuilt, and the views set again, when one of those
    weights was replaced (loading, training). Held as a plain attribute, not a parameter."""

    def __init__(self) -> None:
        self.views: tuple[mx.array, ...] = ()
        self.value: mx.array | None = None

    def get(self, modules: list[nn.Module]) -> mx.array:
        weights = [m["weight"] for m in modules]
        same = len(weights) == len(self.views)
        if same and all(w is v for w, v in zip(weights, self.views)):
            return self.value
        stack = mx.concatenate(weights, axis=0)
        ends = np.cumsum([w.shape[0] for w in weights]).tolist()
        views = [stack[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        mx.eval(stack, views)
        for m, view in zip(modules, views):
            m["weight"] = view
        self.value, self.views = stack, tuple(views)
        return stack


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

    def recurrence(
        self,
        x: mx.array,
        cache: RecurrentState | None,
        rows: CallRows | None = None,
        with_v_hat: bool = True,
    ) -> Recurrence:
        """The GDN branch for x [B, L, D] (`gdn_branch`); rows: the call's real tokens;
        without with_v_hat, v_hat may be None. Updates cache.conv and cache.ssm (not the cache's
        offsets)."""
        valid = None if rows is None else rows.valid
        ends = None if valid is None else rows.stop
        conv, S = (None, None) if cache is None else (cache.conv, cache.ssm)
        # a cached call (no gradient) multiplies by the stacked input weights: one product
        p = self.branch_params(stacked=cache is not None)
        rec, conv, S = gdn_branch(p, x, conv, S, self.step_config(), valid, ends,
                                  cached=cache is not None, with_v_hat=with_v_hat)  # fmt: skip
        if cache is not None:
            cache.conv, cache.ssm = conv, S
        return rec

    def rnn_output(self, rec: Recurrence) -> mx.array:
        """r_t [B, L, HV, Dv] float32 (spec §3 step 8)."""
        return rnn_output(rec, {"o_norm": self.o_norm.weight}, self.step_config())

    # ---- the branch's parameters, and the one-token decode fast path -------------------------
    def step_config(self) -> StepConfig:
        return StepConfig(
            self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim,
            self.allow_neg_eigval, self.use_gate, self.gate_activation, self.norm_eps,
        )  # fmt: skip

    # Item access (self["q_proj"]["weight"]) below: nn.Module is a dict, and its __getattr__
    # costs a few µs per call, which adds up per layer and token.
    def branch_params(self, stacked: bool = False) -> dict:
        """What `gdn_branch` reads: `step_params` (stacked: the input projections as one weight,
        where every projection is a plain Linear; no gradient reaches the modules' own weights
        through it), with the modules in place of the weights when a projection is not a plain
        Linear (quantized)."""
        plain = all(type(m) is nn.Linear for m in self.step_linears())
        p = self.step_params(stacked and plain)
        if plain:
            return p
        names = ("q_proj", "k_proj", "v_proj", "o_proj") + (("g_proj",) if self.use_gate else ())
        p.update({n: self[n] for n in names})
        p["small"] = Stacked(self.small_modules())
        return p

    def small_modules(self) -> list[nn.Module]:
        return [self["a_proj"], self["b_proj"]]

    def step_params(self, stacked: bool = False) -> dict:
        """The weights `gdn_branch` reads, by name; stacked (the decode step): the input
        projections as one weight, "in_proj" (`in_modules`, a `SharedStack`)."""
        gate = ("g_proj",) if self.use_gate else ()
        names = ("o_proj",) if stacked else ("q_proj", "k_proj", "v_proj", "o_proj", *gate)
        if "_conv_weight" not in self.__dict__:  # plain attributes (not parameters)
            self._conv_weight, self._small_weight = Derived(), Derived()
            self._in_stack = SharedStack()
        p = {}
        if stacked:  # first: it may set the projections' weights to views of the stack
            p["in_proj"] = self._in_stack.get(self.in_modules())
        else:
            p["small"] = self._small_weight.get([m["weight"] for m in self.small_modules()])
        p.update({n: self[n]["weight"] for n in names})
        convs = [self[n]["weight"] for n in ("q_conv1d", "k_conv1d", "v_conv1d")]
        p["conv"] = self._conv_weight.get(convs)
        p.update(A_log=self["A_log"], dt_bias=self["dt_bias"], o_norm=self["o_norm"]["weight"])
        return p

    def in_modules(self) -> list[nn.Module]:
        """The input projections the decode step computes as one product: q | k | v (| g) |
        the small ones (`input_projections`' order)."""
        names = ("q_proj", "k_proj", "v_proj") + (("g_proj",) if self.use_gate else ())
        return [self[n] for n in names] + self.small_modules()

    def fast_decode(self, x: mx.array, cache: RecurrentState | None, rows: CallRows) -> bool:
        """Whether this call may take the fixed-shape one-token path (CPU, float32, Kc > 1,
        no padding, unquantized projections: the step multiplies by the weights directly)."""
        return (
            common.FAST_DECODE and cache is not None and x.shape[1] == 1 and rows.valid is None
            and x.dtype == mx.float32 and self.q_conv1d.weight.shape[1] > 1
            and not kernels.kernels_enabled()
            and all(type(m) is nn.Linear for m in self.step_linears())
        )  # fmt: skip

    def step_linears(self) -> list[nn.Module]:
        """The linear layers whose weights the decode step multiplies by directly."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj")
        return [self[n] for n in names + (("g_proj",) if self.use_gate else ())]

    def cache_mismatch(self, cache: RecurrentState) -> str | None:
        """Why a cache's arrays do not fit this layer (None if they do)."""
        C = self.q_conv1d.weight.shape[0] * 2 + self.v_conv1d.weight.shape[0]
        want_ssm = (self.num_v_heads, self.head_v_dim, self.head_dim)
        if cache.ssm is not None and tuple(cache.ssm.shape[1:]) != want_ssm:
            return f"state shape {tuple(cache.ssm.shape[1:])}, expected {want_ssm}"
        want_conv = (self.q_conv1d.weight.shape[1] - 1, C)
        if cache.conv is not None and tuple(cache.conv.shape[1:]) != want_conv:
            return f"conv shape {tuple(cache.conv.shape[1:])}, expected {want_conv}"
        if cache.ssm is not None and cache.conv is None and want_conv[0] > 0:
            return "conv inputs are missing"
        return None

    def decode_state(self, x: mx.array, cache: GDNCache) -> tuple[mx.array, mx.array]:
        """The cache's conv inputs and state, zeros for an empty cache."""
        B = x.shape[0]
        conv, S = cache.conv, cache.ssm
        if conv is None:
            C = self.q_conv1d.weight.shape[0] * 2 + self.v_conv1d.weight.shape[0]
            conv = mx.zeros((B, self.q_conv1d.weight.shape[1] - 1, C), dtype=x.dtype)
        if S is None:
            S = mx.zeros((B, self.num_v_heads, self.head_v_dim, self.head_dim), mx.float32)
        return conv, S

    def decode_plan(self, x: mx.array, cache: GDNCache | None, scores=None) -> DecodePlan | None:
        """The one-token step for x [B, 1, D] (`gdn_decode_step`), or None where the general
        path must run (see `fast_decode`)."""
        if cache is None or x.shape[1] != 1:
            return None
        check_cache(cache, GDNCache, "gdn")
        rows = cache.call_rows(x.shape[0], 1)
        if not self.fast_decode(x, cache, rows):
            return None
        cfg = self.step_config()

        def finish(outs: list) -> None:
            cache.conv, cache.ssm = outs
            cache.advance(rows, 1)

        state = self.decode_state(x, cache)
        threads = mlx_ext.threads_for(list(state))  # the scan step as `gdn_step`, or None
        step = partial(gdn_decode_step, cfg=cfg, threads=threads)
        key = ("gdn", cfg, threads)
        return DecodePlan(key, step, self.step_params(stacked=True), state, finish)

    def __call__(self, x: mx.array, cache: GDNCache | None = None) -> mx.array:
        plan = self.decode_plan(x, cache)
        return self.general(x, cache) if plan is None else run_plan(plan, x)

    def general(self, x: mx.array, cache: GDNCache | None = None) -> mx.array:
        """The general path (any L, padding, quantized layers, GPU kernels)."""
        B, L, _ = x.shape
        check_cache(cache, GDNCache, "gdn")
        rows = None if cache is None else cache.call_rows(B, L)
        rec = self.recurrence(x, cache, rows, with_v_hat=False)  # o only
        if cache is not None:
            cache.advance(rows, L)
        r = self.rnn_output(rec)
        return self.o_proj(r.astype(x.dtype).reshape(B, L, -1))

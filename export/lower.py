"""Lowerings of ham_mlx's modules to ONNX: one function per module class, mirroring its `__call__`
(same names, same order of operations, the same constants read from the model definition).

`lower(ctx, module, *args, name=...)` looks the module's class up in `LOWERINGS` and calls the
registered function inside a naming scope, so nodes are named `/model/layers.0/attn/...` and
parameters become initializers named after the MLX parameter (`model.layers.0.attn.q_proj.weight`,
stored transposed for MatMul). A module without a lowering fails the export with its path and
class. Functions named after an MLX function (`causal_short_conv`, `gated_delta`, `head_surprise`,
`masked_attention`, `gated_output`, ...) lower that function.

The cache is the fixed-capacity one of `cache_io`: the layers read their past tensors and set
their present tensors on a `LayerCache`, as the MLX layers update their cache objects.

Padding (spec §7.1) comes in as `ctx.valid` [B, L] (the last L columns of `attention_mask`): a
padded position never touches a conv or recurrent state (its q|k|v inputs are zeroed, its decay is
1 and its write strength 0, and the conv history is taken at the row's last real token), is never
admitted to a HAM cache, never written to an attention cache, and its own output is never read by
a real token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ham_mlx.layers import common as mlx_common
from ham_mlx.layers.attention import Attention
from ham_mlx.layers.gdn import GatedDeltaNet
from ham_mlx.layers.ham import HAMAttention
from ham_mlx.model import FP32_PARAMS, Backbone, Block, GatedMLP, Model
from ham_mlx.routers import EPS as SCORE_EPS  # of the head surprises and the learned key bias
from ham_mlx.routers import Router, RouterKind, check_table, get_router

from .cache_io import LayerIO
from .graph import FLOAT, INT64, NP_TYPES, Graph

L2NORM_EPS = inspect.signature(mlx_common.l2norm).parameters["eps"].default
LOWERINGS: dict[type, Callable[..., Any]] = {}


class UnsupportedFeature(ValueError):
    """A model feature the ONNX export cannot express."""


def lowers(*classes: type) -> Callable:
    def register(fn: Callable) -> Callable:
        for cls in classes:
            LOWERINGS[cls] = fn
        return fn

    return register


@dataclass
class LayerCache:
    """The graph values of one layer's cache: past inputs in, present outputs out."""

    io: LayerIO
    past: dict[str, str] = field(default_factory=dict)
    present: dict[str, str] = field(default_factory=dict)
    debug: dict[str, str] = field(default_factory=dict)  # ham: surprise, admitted [B, L]


@dataclass
class Context:
    g: Graph
    thresholds: str | None  # [n_ham] float32 constant: one τ per HAM layer
    position_ids: str | None  # [B, L] int64 (models with attn layers)
    caches: list[LayerCache]
    valid: str | None = None  # [B, L] bool: real tokens (None: every position is real)
    path: list[str] = field(default_factory=list)
    ham_index: int = 0
    _padding: dict[Any, str] = field(default_factory=dict)  # made once, at the top level

    def _once(self, key: Any, make: Callable[[Graph], str]) -> str:
        """A padding value shared by all layers, built once under the graph's `/padding` scope."""
        if key not in self._padding:
            g = self.g
            scopes, g._scopes = g._scopes, ["padding"]
            try:
                self._padding[key] = make(g)
            finally:
                g._scopes = scopes
        return self._padding[key]

    def ends(self) -> str | None:
        """[B] int64: one past each row's last real token of the call, first + count (0 when it
        has none; a row's real tokens are one contiguous run)."""
        if self.valid is None:
            return None

        def make(g: Graph) -> str:
            v = g.Cast(self.valid, to=INT64)
            first = g.ArgMax(v, axis=1, keepdims=0)
            return g.Add(first, g.ReduceSum(v, g.i64([1]), keepdims=0))

        return self._once("ends", make)

    def history_rows(self, Kc: int) -> str | None:
        """[B, Kc-1, 1] int64: where each row's last Kc-1 real inputs lie in [conv history; the
        call's inputs], ends[b] + i (None: no padding, or Kc = 1); `causal_short_conv` gathers
        them."""
        if self.valid is None or Kc == 1:
            return None

        def make(g: Graph) -> str:
            rows = g.Add(g.Unsqueeze(self.ends(), g.i64([1])), g.i64(np.arange(Kc - 1)[None]))
            return g.Unsqueeze(rows, g.i64([2]))

        return self._once(("history", Kc), make)

    def masked(self, x: str, rank: int) -> str:
        """x [B, L, ...] (of rank `rank`, finite) with its padded positions zeroed (x itself when
        the graph has no padding): a product with the mask as 0/1, cheaper than a Where."""
        if self.valid is None:
            return x
        elem = self.g.types.get(x, self.g.dtype)

        def make(g: Graph) -> str:
            v = g.Cast(self.valid, to=elem)
            return v if rank == 2 else g.Unsqueeze(v, g.i64(list(range(2, rank))))

        return self.g.Mul(x, self._once(("mask", rank, elem), make))

    def param(self, name: str, array: mx.array, transpose: bool = False) -> str:
        """An initializer named after the MLX parameter, in the compute dtype (FP32_PARAMS fp32)."""
        full = ".".join([*self.path, name])
        w = np.array(array.astype(mx.float32))
        if transpose:
            w = w.T
        dtype = np.float32 if name in FP32_PARAMS else self.g.const_dtype
        return self.g.initializer(full, w.astype(dtype))


def lower(ctx: Context, module: nn.Module, *args: Any, name: str | None, **kwargs: Any) -> Any:
    """Lower `module` (the attribute `name` of the module being lowered; None for the root)."""
    fn = LOWERINGS.get(type(module))
    where = ".".join([*ctx.path, name or type(module).__name__])
    if fn is None:
        raise UnsupportedFeature(
            f"{where}: {type(module).__name__} has no ONNX lowering (supported: "
            f"{', '.join(sorted(c.__name__ for c in LOWERINGS))})"
        )
    if name is None:
        return fn(ctx, module, *args, **kwargs)
    ctx.path.append(name)
    try:
        with ctx.g.scope(name):
            return fn(ctx, module, *args, **kwargs)
    finally:
        ctx.path.pop()


# ---- leaf modules -----------------------------------------------------------------------------
def dense_weight(m: nn.Module) -> mx.array:
    """The weight of a Linear / Embedding; MLX-quantized ones are dequantized (the ONNX graph
    stores them in its own dtype: export with quantize="int8" for an int8 graph)."""
    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size,
                             bits=m.bits, mode=m.mode)  # fmt: skip
    return m.weight


@lowers(nn.Linear, nn.QuantizedLinear)
def linear(ctx: Context, m: nn.Linear, x: str) -> str:
    y = ctx.g.MatMul(x, ctx.param("weight", dense_weight(m), transpose=True))
    return ctx.g.Add(y, ctx.param("bias", m.bias)) if "bias" in m else y


@lowers(nn.RMSNorm)
def rms_norm(ctx: Context, m: nn.RMSNorm, x: str) -> str:
    return ctx.g.RMSNormalization(x, ctx.param("weight", m.weight), epsilon=m.eps, axis=-1)


@lowers(nn.Embedding, nn.QuantizedEmbedding)
def embedding(ctx: Context, m: nn.Embedding, ids: str) -> str:
    return ctx.g.Gather(ctx.param("weight", dense_weight(m)), ids, axis=0)


def embedding_as_linear(ctx: Context, m: nn.Embedding, x: str) -> str:
    """`Embedding.as_linear`: x @ weight.T (tied heads); the weight is stored once."""
    name = "model.embeddings.weight"
    w = name if name in ctx.g.initializers else ctx.param("weight", dense_weight(m))
    return ctx.g.MatMul(x, ctx.g.Transpose(w, perm=[1, 0]))


def silu(g: Graph, x: str) -> str:
    return g.Swish(x)  # x * sigmoid(x), nn.silu


@lowers(GatedMLP)
def gated_mlp(ctx: Context, m: GatedMLP, x: str) -> str:
    g = ctx.g
    gate = lower(ctx, m.gate_proj, x, name="gate_proj")
    up = lower(ctx, m.up_proj, x, name="up_proj")
    return lower(ctx, m.down_proj, g.Mul(silu(g, gate), up), name="down_proj")


# ---- the model ----------------------------------------------------------------------------------
@lowers(Model)
def model_(ctx: Context, m: Model, inputs: str) -> str:
    h = lower(ctx, m.model, inputs, name="model")
    if m.args.tie_word_embeddings:
        with ctx.g.scope("lm_head"):
            return embedding_as_linear(ctx, m.model.embeddings, h)
    return lower(ctx, m.lm_head, h, name="lm_head")


@lowers(Backbone)
def backbone(ctx: Context, m: Backbone, inputs: str) -> str:
    h = lower(ctx, m.embeddings, inputs, name="embeddings")
    for i, (layer, c) in enumerate(zip(m.layers, ctx.caches)):
        h = lower(ctx, layer, h, c, name=f"layers.{i}")
    return lower(ctx, m.norm, h, name="norm")


@lowers(Block)
def block(ctx: Context, m: Block, x: str, cache: LayerCache) -> str:
    g = ctx.g
    x = g.Add(
        x, lower(ctx, m.attn, lower(ctx, m.attn_norm, x, name="attn_norm"), cache, name="attn")
    )
    return g.Add(x, lower(ctx, m.mlp, lower(ctx, m.mlp_norm, x, name="mlp_norm"), name="mlp"))


# ---- common pieces (ham_mlx.layers.common) -------------------------------------------------------
def l2norm(g: Graph, x: str, eps: float = L2NORM_EPS) -> str:
    """x / sqrt(sum(x^2) + eps) over the last axis."""
    ss = g.ReduceSum(g.Mul(x, x), g.i64([-1]), keepdims=1)
    return g.Mul(x, g.Reciprocal(g.Sqrt(g.Add(ss, g.const(eps)))))


def causal_short_conv(g: Graph, x: str, weight: np.ndarray, prev: str | None, rows=None):
    """Depthwise causal conv + SiLU. x [B, L, C]; weight [C, Kc, 1]; prev [B, Kc-1, C]; rows
    None (every input is real) or `Context.history_rows`: where each row's last Kc-1 real inputs
    of [prev; x] lie (right padding ends a row early).
    Returns (SiLU(conv) [B, L, C], the last Kc-1 real inputs [B, Kc-1, C] or None when Kc = 1)."""
    Kc = weight.shape[1]
    if Kc == 1:
        return silu(g, g.Mul(x, g.const(weight[:, 0, 0]))), None
    L = g.dim(x, 1)
    xp = g.Concat(g.cast(prev, g.types[x]), x, axis=1)  # [B, Kc-1+L, C]
    w = weight[:, :, 0].T  # [Kc, C]

    def taps(i):  # xp[:, i : i + L]
        return g.Slice(xp, g.i64([i]), g.Add(L, g.i64([i])), g.i64([1]))

    y = g.Mul(taps(0), g.const(w[0]))
    for i in range(1, Kc):
        y = g.Add(y, g.Mul(taps(i), g.const(w[i])))
    if rows is None:
        return silu(g, y), g.Slice(xp, g.i64([-(Kc - 1)]), g.i64([2**62]), g.i64([1]))
    # xp[b, ends[b] : ends[b] + Kc - 1]: the inputs before a row's first pad (its prev when the
    # call has no real token for it)
    return silu(g, y), g.GatherND(xp, rows, batch_dims=1)


def gated_rms_norm(g: Graph, x: str, gate: str | None, weight: str, eps: float, activation: str):
    """RMSNorm(x) * weight * act(gate) over the last axis (Dv)."""
    y = g.RMSNormalization(x, weight, epsilon=eps, axis=-1)
    if gate is None:
        return y
    return g.Mul(y, g.Sigmoid(gate) if activation == "sigmoid" else silu(g, gate))


def repeat_heads(g: Graph, x: str, groups: int, axis: int) -> str:
    """mx.repeat(x, groups, axis): repeat-interleave heads (head j reads j // groups)."""
    if groups == 1:
        return x
    shape = g.Shape(x)
    y = g.Unsqueeze(x, g.i64([axis + 1]))
    tiled = g.Concat(
        g.Slice(shape, g.i64([0]), g.i64([axis + 1])),
        g.i64([groups]),
        g.Slice(shape, g.i64([axis + 1]), g.i64([2**62])),
        axis=0,
    )
    y = g.Expand(y, tiled)
    out = g.Concat(
        g.Slice(shape, g.i64([0]), g.i64([axis])),
        g.i64([-1]),
        g.Slice(shape, g.i64([axis + 1]), g.i64([2**62])),
        axis=0,
    )
    return g.Reshape(y, out)


# ---- the gated delta rule (ham_mlx.ops.gated_delta) ---------------------------------------------
def cosine_surprise(g: Graph, v_hat: str, v: str) -> str:
    """The cosine router's e^j [..., HV] from v_hat, v [..., HV, Dv] float32."""
    last = g.i64([-1])
    dot = g.ReduceSum(g.Mul(v_hat, v), last, keepdims=0)
    norms = g.Mul(
        g.Add(g.ReduceSum(g.Mul(v_hat, v_hat), last, keepdims=0), g.f32(SCORE_EPS)),
        g.Add(g.ReduceSum(g.Mul(v, v), last, keepdims=0), g.f32(SCORE_EPS)),
    )
    return g.Sub(g.f32(1.0), g.Mul(dot, g.Reciprocal(g.Sqrt(norms))))


def l2_surprise(g: Graph, v_hat: str, v: str) -> str:
    """The l2 router's e^j [..., HV] from v_hat, v [..., HV, Dv] float32."""
    last = g.i64([-1])
    err = g.Sub(v, v_hat)
    return g.Div(
        g.ReduceSum(g.Mul(err, err), last, keepdims=0),
        g.Add(g.ReduceSum(g.Mul(v, v), last, keepdims=0), g.f32(SCORE_EPS)),
    )


def head_surprise(g: Graph, v_hat: str, v: str, kind: RouterKind) -> str:
    """e^j per value head [..., HV] from v_hat, v [..., HV, Dv] (float32), for a head router."""
    if not kind.per_head:
        raise ValueError(f"router {kind.name!r} has no head surprise (its score is learned)")
    return ROUTER_LOWERINGS[kind.name](g, v_hat, g.to_f32(v))


def gated_delta(g: Graph, q, k, v, gd, beta, state, heads: tuple[int, int, int, int], emit=None):
    """`gated_delta_sequential` as one `Scan` over time.

    q, k [B, T, H, Dk] (q l2-normalised and scaled), v [B, T, HV, Dv], gd (log decay) and beta
    [B, T, HV], state [B, HV, Dv, Dk] float32; heads = (H, HV, Dv, Dk). `emit(body, v_hat_t, v_t)
    -> [B]` adds a per-step output computed inside the loop (the HAM layer's token score).
    Returns (o [B, T, HV, Dv], emitted [B, T] or None, final state).
    """
    H, HV, Dv, Dk = heads
    # _prepare: float32, q/k repeated to HV heads.
    q, k, v, gd, beta = (g.to_f32(x) for x in (q, k, v, gd, beta))
    q, k = repeat_heads(g, q, HV // H, axis=2), repeat_heads(g, k, HV // H, axis=2)
    alpha = g.Exp(gd)

    body = g.subgraph("gated_delta_step")
    S = body.input(body.fresh("state_in"), FLOAT, ["batch", HV, Dv, Dk])
    q_t = body.input(body.fresh("q_t"), FLOAT, ["batch", HV, Dk])
    k_t = body.input(body.fresh("k_t"), FLOAT, ["batch", HV, Dk])
    v_t = body.input(body.fresh("v_t"), FLOAT, ["batch", HV, Dv])
    a_t = body.input(body.fresh("alpha_t"), FLOAT, ["batch", HV])
    b_t = body.input(body.fresh("beta_t"), FLOAT, ["batch", HV])
    kc = body.Unsqueeze(k_t, body.i64([-1]))  # [B, HV, Dk, 1]
    kr = body.Unsqueeze(k_t, body.i64([-2]))  # [B, HV, 1, Dk]
    qc = body.Unsqueeze(q_t, body.i64([-1]))
    vc = body.Unsqueeze(v_t, body.i64([-1]))  # [B, HV, Dv, 1]
    alpha_t = body.Unsqueeze(a_t, body.i64([-1, -2]))  # [B, HV, 1, 1]
    beta_t = body.Unsqueeze(b_t, body.i64([-1, -2]))
    S = body.Mul(alpha_t, S)  # decay first
    v_hat = body.MatMul(S, kc)  # [B, HV, Dv, 1]: the prediction, before the write
    S = body.Add(S, body.Mul(body.Mul(beta_t, body.Sub(vc, v_hat)), kr))
    o = body.MatMul(S, qc)  # read after the write
    body.output(S, body.fresh("state_out"), FLOAT, ["batch", HV, Dv, Dk])
    body.output(body.Squeeze(o, body.i64([-1])), body.fresh("o_t"), FLOAT, ["batch", HV, Dv])
    n_out = 2
    if emit is not None:
        e = emit(body, body.Squeeze(v_hat, body.i64([-1])), v_t)
        body.output(e, body.fresh("emit_t"), FLOAT, ["batch"])
        n_out = 3
    outs = g.op(
        "Scan",
        state,
        q,
        k,
        v,
        alpha,
        beta,
        n_out=n_out,
        out_types=[FLOAT] * n_out,
        body=body.make_graph(),
        num_scan_inputs=5,
        scan_input_axes=[1] * 5,
        scan_output_axes=[1] * (n_out - 1),
    )
    return outs[1], (outs[2] if emit is not None else None), outs[0]


# ---- attention (ham_mlx.ops.attention, mx.fast.scaled_dot_product_attention) -------------------
def scaled_dot_product_attention(g: Graph, q, k, v, scale: float, mask, sinks, heads):
    """mx.fast.scaled_dot_product_attention: q [B, Nq, L, D], k [B, Nk, n, D], v [B, Nv, n, Dv];
    query head h reads key head h // (Nq / Nk) and value head h // (Nq / Nv) (no repeats: the
    heads are grouped by reshaping). mask bool [B|1, 1, L, n] (True = attend); sinks [Nq] or None
    (a logit in the denominator with a zero value). Returns [B, Nq, L, Dv]."""
    Nq, Nk, Nv = heads
    if scale != 1.0:
        q = g.Mul(q, g.const(scale))
    logits = g.MatMul(g.Reshape(q, g.i64([0, Nk, -1, 0])), g.Transpose(k, perm=[0, 1, 3, 2]))
    logits = g.Reshape(logits, g.i64([0, Nq, -1, 0]))  # [B, Nq, L, n]
    logits = g.Where(mask, logits, g.const(-np.inf))
    if sinks is None:
        probs = g.Softmax(logits, axis=-1)
    else:
        n = g.dim(logits, 3)
        column = g.Expand(
            g.Reshape(sinks, g.i64([1, Nq, 1, 1])),
            g.Concat(g.Shape(logits, end=3), g.i64([1]), axis=0),
        )
        probs = g.Softmax(g.Concat(logits, column, axis=-1), axis=-1)
        probs = g.Slice(probs, g.i64([0]), n, g.i64([3]))  # the sink's value is zero
    o = g.MatMul(g.Reshape(probs, g.i64([0, Nv, -1, 0])), v)
    return g.Reshape(o, g.i64([0, Nq, -1, 0]))


def masked_attention(g: Graph, q, k, v, mask, log_scale: str, sink: str, heads, key_bias_dim=None):
    """ops.attention.masked_attention: logits exp(log_scale[n]) * (q · k) (+ the key bias, stored
    as a key column that queries meet with a 1), softmax with the sink. q [B, HV, L, Dk]."""
    q = g.Mul(q, g.cast(g.Reshape(g.Exp(g.to_f32(log_scale)), g.i64([-1, 1, 1])), g.types[q]))
    if key_bias_dim is not None:  # q gets a 1 in the key-bias column, zeros in the padding
        ones = g.Expand(
            g.const(np.ones((1, 1, 1, 1))), g.Concat(g.Shape(q, end=3), g.i64([1]), axis=0)
        )
        q = g.Concat(q, ones, axis=-1)
    width = g.dim(k, 3)
    pad = g.Sub(width, g.dim(q, 3))
    q = g.Pad(q, g.Concat(g.i64([0, 0, 0, 0, 0, 0, 0]), pad, axis=0))
    return scaled_dot_product_attention(g, q, k, v, 1.0, mask, g.cast(sink, g.types[q]), heads)


def gated_output(g: Graph, o: str, gate: str, weight: str, eps: float) -> str:
    """sigmoid(gate) * RMSNorm(o) * weight, float32: o [B, HV, L, Dv], gate [B, L, HV] ->
    [B, L, HV, Dv]."""
    o = g.to_f32(g.Transpose(o, perm=[0, 2, 1, 3]))
    o = g.RMSNormalization(o, g.to_f32(weight), epsilon=eps, axis=-1)
    return g.Mul(g.Unsqueeze(g.Sigmoid(g.to_f32(gate)), g.i64([-1])), o)


# ---- the fixed-capacity caches (the twins of HAMCache with kv_policy="reject", AttnCache) ------
def read_conv_state(g: Graph, cache: LayerCache):
    """(conv history [B, Kc-1, C] or None, admitted count [B] int64) from conv_state."""
    past = cache.past["conv_state"]
    Kc = cache.io.conv[0]
    history = None
    if Kc > 1:
        history = g.Slice(past, g.i64([0]), g.i64([Kc - 1]), g.i64([1]))
    count = g.Gather(g.Gather(past, g.i64(Kc - 1), axis=1), g.i64(0), axis=1)
    return history, g.Cast(count, to=INT64)


def write_conv_state(g: Graph, cache: LayerCache, history: str | None, count: str | None):
    """present conv_state = [history; count row] (float32). count None keeps the past row."""
    past = cache.past["conv_state"]
    Kc, C = cache.io.conv
    if count is None:
        row = g.Slice(past, g.i64([Kc - 1]), g.i64([Kc]), g.i64([1]))
    else:
        row = g.Pad(
            g.Reshape(g.Cast(count, to=FLOAT), g.i64([-1, 1, 1])), g.i64([0, 0, 0, 0, 0, C - 1])
        )
    parts = ([g.to_f32(history)] if history is not None else []) + [row]
    cache.present["conv_state"] = g.Concat(*parts, axis=1) if len(parts) > 1 else g.Identity(row)


def ham_cache_limit(g: Graph, admitted: str, count: str, capacity: str):
    """HAMCache.limit with kv_policy="reject": tokens that do not fit are refused,
    fits = count + CumSum(admitted) <= N. Returns (admitted, CumSum of the result)."""
    total = g.Add(g.CumSum(g.Cast(admitted, to=INT64), g.i64(1)), g.Unsqueeze(count, g.i64([1])))
    admitted = g.And(admitted, g.LessOrEqual(total, capacity))
    return admitted, g.CumSum(g.Cast(admitted, to=INT64), g.i64(1))


def along_slots(g: Graph, x: str, index: str) -> str:
    """x[b, :, index[b, s], :]: x [B, Hc, N, P], index [B, S] -> [B, Hc, S, P]."""
    idx = g.Unsqueeze(index, g.i64([1, 3]))
    shape = g.Concat(g.Shape(x, end=2), g.Shape(index, start=1), g.Shape(x, start=3), axis=0)
    return g.GatherElements(x, g.Expand(idx, shape), axis=2)


def ham_cache_write(g: Graph, past: str, new: str, admitted: str, cum: str, count: str, capacity):
    """HAMCache.append into a fixed buffer: row b's admitted tokens go to slots count[b], ...
    in order, with one circular `TensorScatter` for all rows.

    past [B, Hc, N, P]; new [B, Hc, L, P]; admitted, cum [B, L]. The update is the admitted
    tokens first (a per-row permutation), then, for the update's other positions, the buffer's
    own contents at the slots they land on, so those writes change nothing."""
    L = g.dim(new, 2)
    n_new = g.ReduceSum(g.Cast(admitted, to=INT64), g.i64([1]), keepdims=1)  # [B, 1]
    t = g.Unsqueeze(g.Range(g.i64(0), g.Squeeze(L, g.i64([0])), g.i64(1)), g.i64([0]))  # [1, L]
    # slot of token t in the update: admitted ones first (cum - 1), the others after them
    perm = g.Where(admitted, g.Sub(cum, g.i64(1)), g.Add(n_new, g.Sub(t, cum)))
    src = g.ScatterElements(
        g.Expand(g.i64(0), g.Shape(perm)), perm, g.Expand(t, g.Shape(perm)), axis=1
    )
    width = g.Min(L, capacity)  # the update never covers a slot twice
    src = g.Slice(src, g.i64([0]), width, g.i64([1]))  # [B, S']
    s = g.Unsqueeze(g.Range(g.i64(0), g.Squeeze(width, g.i64([0])), g.i64(1)), g.i64([0]))
    slot = g.Mod(g.Add(g.Unsqueeze(count, g.i64([1])), s), capacity)  # [B, S']

    fresh = g.Less(s, n_new)  # [B, S']: the update position holds a new entry
    update = g.Where(
        g.Unsqueeze(fresh, g.i64([1, 3])), along_slots(g, new, src), along_slots(g, past, slot)
    )
    return g.TensorScatter(past, update, count, axis=2, mode="circular")


def valid_prefix(g: Graph, buffer: str, n: str) -> str:
    """buffer[:, :, :n]: attention reads only the slots that can be valid."""
    return g.Slice(buffer, g.i64([0]), n, g.i64([2]))


def ham_entries_layout(g: Graph, io: LayerIO, k: str, v: str, key_bias: str | None):
    """k [B, H, L, Dk], v [B, HV, L, Dv] -> the buffer layout of cache_io (bias column, padding,
    GVA values grouped by q/k head in the genai layout)."""
    if key_bias is not None:
        bias = g.Expand(
            g.Unsqueeze(g.cast(key_bias, g.types[k]), g.i64([1, 3])),
            g.Concat(g.Shape(k, end=3), g.i64([1]), axis=0),
        )
        k = g.Concat(k, bias, axis=-1)
    if io.key[1] > io.key_dim:
        k = g.Pad(k, g.i64([0, 0, 0, 0, 0, 0, 0, io.key[1] - io.key_dim]))
    G = io.value_groups
    HV, Dv, _ = io.recurrent
    if io.value[0] != HV:  # [B, HV, L, Dv] -> [B, H, L, G * Dv]
        v = g.Reshape(v, g.i64([0, io.value[0], G, -1, Dv]))
        v = g.Reshape(g.Transpose(v, perm=[0, 1, 3, 2, 4]), g.i64([0, 0, 0, G * Dv]))
    if io.value[1] > G * Dv:
        v = g.Pad(v, g.i64([0, 0, 0, 0, 0, 0, 0, io.value[1] - G * Dv]))
    return k, v


def ham_values_per_head(g: Graph, io: LayerIO, values: str) -> str:
    """The stored values as [B, HV, n, Dv] (undo ham_entries_layout)."""
    HV, Dv, _ = io.recurrent
    G = io.value_groups
    if io.value[1] > G * Dv:
        values = g.Slice(values, g.i64([0]), g.i64([G * Dv]), g.i64([3]))
    if io.value[0] != HV:
        values = g.Reshape(values, g.i64([0, 0, 0, G, Dv]))
        values = g.Reshape(g.Transpose(values, perm=[0, 1, 3, 2, 4]), g.i64([0, HV, -1, Dv]))
    return values


# ---- the mixers ---------------------------------------------------------------------------------
@dataclass
class Recurrence:
    q: str  # [B, L, H, Dk] l2-normalised, before the Dk^-0.5 scale
    k: str  # [B, L, H, Dk]
    v: str  # [B, L, HV, Dv]
    o: str  # [B, L, HV, Dv] float32
    emitted: str | None  # [B, L] what `emit` computed inside the scan (the HAM token score)


def recurrence(ctx: Context, m: GatedDeltaNet, x: str, cache: LayerCache, emit=None):
    """GatedDeltaNet.recurrence: projections, short conv, decay/beta and the delta-rule scan.
    Sets the present recurrent_state; returns (Recurrence, the new conv history)."""
    g = ctx.g
    H, HV, Dk, Dv = m.num_heads, m.num_v_heads, m.head_dim, m.head_v_dim
    qkv = g.Concat(
        lower(ctx, m.q_proj, x, name="q_proj"),
        lower(ctx, m.k_proj, x, name="k_proj"),
        lower(ctx, m.v_proj, x, name="v_proj"),
        axis=-1,
    )
    qkv = ctx.masked(qkv, 3)  # a pad's inputs are zeros: the conv never reads it
    w = mx.concatenate([m.q_conv1d.weight, m.k_conv1d.weight, m.v_conv1d.weight])
    history, _ = read_conv_state(g, cache)
    Kc = w.shape[1]
    qkv, conv_state = causal_short_conv(
        g, qkv, np.array(w.astype(mx.float32)), history, ctx.history_rows(Kc)
    )
    q, k, v = g.op("Split", qkv, g.i64([H * Dk, H * Dk, HV * Dv]), n_out=3, axis=-1)
    q = l2norm(g, g.Reshape(q, g.i64([0, 0, H, Dk])))
    k = l2norm(g, g.Reshape(k, g.i64([0, 0, H, Dk])))
    v = g.Reshape(v, g.i64([0, 0, HV, Dv]))
    a = g.to_f32(lower(ctx, m.a_proj, x, name="a_proj"))  # [B, L, HV]
    gd = g.Mul(
        g.Neg(g.Exp(ctx.param("A_log", m.A_log))),
        g.Softplus(g.Add(a, ctx.param("dt_bias", m.dt_bias))),
    )
    beta = g.Sigmoid(g.to_f32(lower(ctx, m.b_proj, x, name="b_proj")))
    if m.allow_neg_eigval:
        beta = g.Mul(g.f32(2.0), beta)
    gd, beta = ctx.masked(gd, 3), ctx.masked(beta, 3)  # padded steps: S <- 1 * S + 0
    state = cache.past["recurrent_state"]
    o, emitted, state = gated_delta(
        g, g.Mul(q, g.const(Dk**-0.5)), k, v, gd, beta, state, (H, HV, Dv, Dk), emit
    )
    cache.present["recurrent_state"] = state
    return Recurrence(q, k, v, o, emitted), conv_state


def rnn_output(ctx: Context, m: GatedDeltaNet, x: str, o: str) -> str:
    """GatedDeltaNet.rnn_output: RMSNorm(o) * w_onorm * act(gate), [B, L, HV, Dv] float32."""
    g = ctx.g
    gate = None
    if m.use_gate:
        gate = g.Reshape(
            lower(ctx, m.g_proj, x, name="g_proj"), g.i64([0, 0, m.num_v_heads, m.head_v_dim])
        )
        gate = g.to_f32(gate)
    ctx.path.append("o_norm")
    weight = g.to_f32(ctx.param("weight", m.o_norm.weight))
    ctx.path.pop()
    return gated_rms_norm(g, o, gate, weight, m.norm_eps, m.gate_activation)


@lowers(GatedDeltaNet)
def gated_deltanet(ctx: Context, m: GatedDeltaNet, x: str, cache: LayerCache) -> str:
    g = ctx.g
    rec, history = recurrence(ctx, m, x, cache)
    write_conv_state(g, cache, history, None)
    r = rnn_output(ctx, m, x, rec.o)
    return lower(ctx, m.o_proj, g.Reshape(g.cast(r, g.types[x]), g.i64([0, 0, -1])), name="o_proj")


@lowers(Router)
def router(ctx: Context, m: Router, h: str) -> str:
    g = ctx.g
    r = lower(ctx, m.fc2, silu(g, lower(ctx, m.fc1, h, name="fc1")), name="fc2")
    return g.Sigmoid(g.to_f32(g.Squeeze(r, g.i64([-1]))))  # [B, L]


def learned_score(ctx: Context, m: HAMAttention, h: str) -> str:
    """A learned router's r_t [B, L] from the layer input h: the layer's `router` module."""
    return lower(ctx, m.router, h, name="router")


# The token score of each router kind (ham_mlx.routers.ROUTERS). A head router's entry lowers its
# `head_surprise` (g, v_hat, v [..., HV, Dv] float32) -> e [..., HV], reduced by a min over heads
# inside the recurrence's scan; a learned router's entry is (ctx, layer, h) -> r [B, L].
ROUTER_LOWERINGS: dict[str, Callable[..., str]] = {
    "cosine": cosine_surprise,
    "l2": l2_surprise,
    "learned": learned_score,
}
check_table(ROUTER_LOWERINGS, "export.lower.ROUTER_LOWERINGS")


@lowers(HAMAttention)
def ham_attention(ctx: Context, m: HAMAttention, x: str, cache: LayerCache) -> str:
    g = ctx.g
    io = cache.io
    H, HV = m.num_heads, m.num_v_heads
    kind = get_router(m.router_kind)
    learned = kind.learned

    def token_score(body, v_hat, v):  # HAMAttention.surprise, computed inside the scan
        return body.ReduceMin(head_surprise(body, v_hat, v, kind), body.i64([-1]), keepdims=0)

    rec, history = recurrence(ctx, m, x, cache, emit=None if learned else token_score)
    score = ROUTER_LOWERINGS[kind.name](ctx, m, x) if learned else rec.emitted  # [B, L]
    tau = g.Gather(ctx.thresholds, g.i64(ctx.ham_index))
    ctx.ham_index += 1
    admitted = g.GreaterOrEqual(score, tau)  # [B, L]
    if ctx.valid is not None:  # a pad is never admitted
        admitted = g.And(admitted, ctx.valid)
    _, count = read_conv_state(g, cache)
    capacity = g.dim(cache.past["key"], 2)
    admitted, cum = ham_cache_limit(g, admitted, count, capacity)
    cache.debug = {"surprise": score, "admitted": admitted}

    q = g.Transpose(rec.q, perm=[0, 2, 1, 3])  # [B, H, L, Dk]
    k = g.Transpose(rec.k, perm=[0, 2, 1, 3])  # [B, H, L, Dk]
    v = g.Transpose(rec.v, perm=[0, 2, 1, 3])  # [B, HV, L, Dv]
    gate = lower(ctx, m.kv_gate_proj, x, name="kv_gate_proj")  # [B, L, HV]
    # cache.append(k, v, score, admitted), then attend over the compact cache
    key_bias = g.Log(g.Max(score, g.f32(SCORE_EPS))) if kind.key_bias_column else None
    k_rows, v_rows = ham_entries_layout(g, io, k, v, key_bias)
    keys = ham_cache_write(
        g,
        cache.past["key"],
        g.cast(k_rows, g.types[cache.past["key"]]),
        admitted,
        cum,
        count,
        capacity,
    )
    values = ham_cache_write(
        g,
        cache.past["value"],
        g.cast(v_rows, g.types[cache.past["value"]]),
        admitted,
        cum,
        count,
        capacity,
    )
    cache.present["key"], cache.present["value"] = keys, values
    new_count = g.Add(count, g.ReduceSum(g.Cast(admitted, to=INT64), g.i64([1]), keepdims=0))
    write_conv_state(g, cache, history, new_count)

    n = g.Max(g.Reshape(g.ReduceMax(new_count, keepdims=1), g.i64([1])), g.i64([1]))
    keys, values = valid_prefix(g, keys, n), ham_values_per_head(g, io, valid_prefix(g, values, n))
    # slot j (in position order) is visible to query i iff j < count + admitted tokens up to i
    limit = g.Add(g.Unsqueeze(count, g.i64([1])), cum)  # [B, L]
    slots = g.Range(g.i64(0), g.Squeeze(n, g.i64([0])), g.i64(1))
    mask = g.Unsqueeze(
        g.Less(g.Reshape(slots, g.i64([1, 1, -1])), g.Unsqueeze(limit, g.i64([2]))), g.i64([1])
    )  # [B, 1, L, n]
    q_heads = repeat_heads(g, q, HV // H, axis=1)  # [B, HV, L, Dk]
    dtype = g.types[q]
    ctx.path.append("kv_norm")
    norm_weight = ctx.param("weight", m.kv_norm.weight)
    ctx.path.pop()
    o_kv = masked_attention(
        g,
        q_heads,
        g.cast(keys, dtype),
        g.cast(values, dtype),
        mask,
        ctx.param("attn_log_scale", m.attn_log_scale),
        ctx.param("attn_sink", m.attn_sink),
        (HV, H, HV),
        key_bias_dim=io.key_dim - 1 if kind.key_bias_column else None,
    )
    kv_out = gated_output(g, o_kv, gate, norm_weight, m.norm_eps)  # [B, L, HV, Dv]
    y = g.Add(rnn_output(ctx, m, x, rec.o), kv_out)
    return lower(ctx, m.o_proj, g.Reshape(g.cast(y, g.types[x]), g.i64([0, 0, -1])), name="o_proj")


def rope(g: Graph, x: str, positions: str, dims: int, base: float, hd: int | None = None) -> str:
    """nn.RoPE(dims, traditional=False, base): NeoX half-split rotation at `positions` [B, L] of
    the first `dims` of the hd features (partial RoPE: the rest pass through)."""
    inv_freq = (base ** (-np.arange(0, dims, 2, dtype=np.float32) / dims)).astype(np.float32)
    theta = g.Mul(g.Unsqueeze(g.Cast(positions, to=FLOAT), g.i64([1, 3])), g.f32(inv_freq))
    cos, sin = g.Cos(theta), g.Sin(theta)  # [B, 1, L, dims/2]
    xf = g.to_f32(x)
    x1 = g.Slice(xf, g.i64([0]), g.i64([dims // 2]), g.i64([3]))
    x2 = g.Slice(xf, g.i64([dims // 2]), g.i64([dims]), g.i64([3]))
    parts = [g.Sub(g.Mul(x1, cos), g.Mul(x2, sin)), g.Add(g.Mul(x1, sin), g.Mul(x2, cos))]
    if hd is not None and dims < hd:
        parts.append(g.Slice(xf, g.i64([dims]), g.i64([hd]), g.i64([3])))
    return g.cast(g.Concat(*parts, axis=-1), g.types[x])


@lowers(Attention)
def attention(ctx: Context, m: Attention, x: str, cache: LayerCache) -> str:
    g = ctx.g
    hd = m.head_dim

    def heads(y, n):  # [B, L, n*hd] -> [B, n, L, hd]
        return g.Transpose(g.Reshape(y, g.i64([0, 0, n, hd])), perm=[0, 2, 1, 3])

    q = lower(ctx, m.q_proj, x, name="q_proj")
    gate = None
    if m.gated:  # per head [query | gate]: Attention.query
        qg = g.Reshape(q, g.i64([0, 0, m.num_heads, 2 * hd]))
        q = g.Slice(qg, g.i64([0]), g.i64([hd]), g.i64([3]))
        gate = g.Reshape(g.Slice(qg, g.i64([hd]), g.i64([2 * hd]), g.i64([3])), g.i64([0, 0, -1]))
    k = lower(ctx, m.k_proj, x, name="k_proj")
    if "q_norm" in m:  # over each head's hd features, before RoPE
        q = g.Reshape(q, g.i64([0, 0, m.num_heads, hd]))
        q = lower(ctx, m.q_norm, q, name="q_norm")
        k = lower(ctx, m.k_norm, g.Reshape(k, g.i64([0, 0, m.num_kv_heads, hd])), name="k_norm")
    q = heads(q, m.num_heads)
    k = heads(k, m.num_kv_heads)
    v = heads(lower(ctx, m.v_proj, x, name="v_proj"), m.num_kv_heads)
    positions = ctx.position_ids  # [B, L]: a real token's position in its row (pads: any)
    q = rope(g, q, positions, m.rope.dims, m.rope.base, hd)
    k = rope(g, k, positions, m.rope.dims, m.rope.base, hd)
    # cache.update_and_fetch: slot = position mod N (circular), then read the slots that can hold
    # a position <= the row's last
    past_k, past_v = cache.past["key"], cache.past["value"]
    capacity = g.dim(past_k, 2)
    if ctx.valid is None:
        first = g.Gather(positions, g.i64(0), axis=1)  # [B]
        last = g.Gather(positions, g.i64(-1), axis=1)
        new_k, new_v = g.cast(k, g.types[past_k]), g.cast(v, g.types[past_v])
    else:
        # the call's L positions are written as one run from the slot of position
        # (position of the row's first real token) - (its index), pads keeping the slot's contents
        valid = ctx.valid
        f = g.ArgMax(g.Cast(valid, to=INT64), axis=1, keepdims=1)  # [B, 1] first real token
        first = g.Squeeze(g.Sub(g.GatherElements(positions, f, axis=1), f), g.i64([1]))
        first = g.Mod(first, g.Squeeze(capacity, g.i64([0])))
        last = g.ReduceMax(g.Where(valid, positions, g.i64(-1)), g.i64([1]), keepdims=0)
        L = g.dim(positions, 1)
        t = g.Unsqueeze(g.Range(g.i64(0), g.Squeeze(L, g.i64([0])), g.i64(1)), g.i64([0]))
        slot = g.Mod(g.Add(g.Unsqueeze(first, g.i64([1])), t), capacity)  # [B, L]
        keep = g.Unsqueeze(valid, g.i64([1, 3]))
        new_k = g.Where(keep, g.cast(k, g.types[past_k]), along_slots(g, past_k, slot))
        new_v = g.Where(keep, g.cast(v, g.types[past_v]), along_slots(g, past_v, slot))
    keys = g.TensorScatter(past_k, new_k, first, axis=2, mode="circular")
    values = g.TensorScatter(past_v, new_v, first, axis=2, mode="circular")
    cache.present["key"], cache.present["value"] = keys, values
    top = g.Reshape(g.ReduceMax(last, keepdims=1), g.i64([1]))
    n = g.Min(capacity, g.Max(g.Add(top, g.i64([1])), g.i64([1])))
    keys, values = valid_prefix(g, keys, n), valid_prefix(g, values, n)
    j = g.Unsqueeze(g.Range(g.i64(0), g.Squeeze(n, g.i64([0])), g.i64(1)), g.i64([0]))  # [1, n]
    lastc = g.Unsqueeze(last, g.i64([1]))
    k_pos = g.Sub(lastc, g.Mod(g.Sub(lastc, j), capacity))  # [B, n] position held by slot j
    q_pos = g.Unsqueeze(positions, g.i64([2]))  # [B, L, 1]
    k_pos = g.Unsqueeze(k_pos, g.i64([1]))  # [B, 1, n]
    mask = g.LessOrEqual(k_pos, q_pos)
    if ctx.valid is not None:  # rows behind the longest: their slots past `last` hold nothing
        mask = g.And(mask, g.GreaterOrEqual(k_pos, g.i64(0)))
    if m.window is not None:
        mask = g.And(mask, g.Greater(k_pos, g.Sub(q_pos, g.i64(m.window))))
    mask = g.Unsqueeze(mask, g.i64([1]))  # [B, 1, L, n]
    dtype = g.types[q]
    o = scaled_dot_product_attention(
        g,
        q,
        g.cast(keys, dtype),
        g.cast(values, dtype),
        hd**-0.5,
        mask,
        None,
        (m.num_heads, m.num_kv_heads, m.num_kv_heads),
    )
    if ctx.valid is not None:  # a pad's query may see no key at all (0/0): zero its output
        o = g.Where(g.Unsqueeze(ctx.valid, g.i64([1, 3])), o, g.const(0.0, NP_TYPES[g.types[o]]))
    o = g.Reshape(g.Transpose(o, perm=[0, 2, 1, 3]), g.i64([0, 0, -1]))
    if gate is not None:
        o = g.Mul(o, g.Sigmoid(gate))
    return lower(ctx, m.o_proj, o, name="o_proj")

"""The HAM mixer: GDN branch + surprise router + attention over admitted tokens (spec §4)."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ham_mlx import kernels
from ham_mlx.admission import admit
from ham_mlx.cache import HAMCache
from ham_mlx.cache.kv_buffer import Entries, append_slots, scatter_entries
from ham_mlx.config import ModelArgs
from ham_mlx.layers.common import DecodePlan, check_cache, run_plan
from ham_mlx.layers.gdn import GatedDeltaNet, gdn_branch, linear, rnn_output
from ham_mlx.ops import mlx_ext
from ham_mlx.ops.attention import (
    admitted_attention,
    buffer_attention,
    cached_admitted_attention,
    gated_output,
)
from ham_mlx.routers import (
    EPS,
    Router,
    get_router,
    head_surprise,
    key_bias,
    learned_score,
    token_score,
)

SLOT_BUCKET = 32
_SLOTS: dict[int, mx.array] = {}
_NO_SLOTS = mx.zeros((0,), dtype=mx.int32)


def attended_slots(n: int, alloc: int) -> mx.array:
    """An array [m] whose length m >= n is the number of buffer slots the decode step attends:
    n rounded up to SLOT_BUCKET (at most alloc), so that the compiled step retraces (a few ms, no
    new C++) once per bucket rather than once per admitted token."""
    m = min(alloc, -(-n // SLOT_BUCKET) * SLOT_BUCKET)
    if m not in _SLOTS:
        _SLOTS[m] = mx.zeros((m,), dtype=mx.int32)
    return _SLOTS[m]


def decode_step(p, x, conv, S, entries, count, positions, tau, cap, scratch, slots, cfg):
    """One token through a HAM layer with a cache, as a pure fixed-shape function (the fast
    decode path), made of the general path's functions: `gdn_branch`, `head_surprise` /
    `learned_score`, `admit`, `append_slots`/`scatter_entries`, `rnn_output`, `gated_output`.
    Its one special form is `buffer_attention` (one query per row, no mask tensor), beside its
    twin in ops.

    p: the layer's weights (`step_params`); x [B, 1, D]; conv, S: the GDN state; entries: the
    HAMCache buffers (room for this token and the scratch slot already made), count [B];
    positions [B, 1] int32: this token's position per row; tau: scalar or [B, 1]; cap: int32
    scalar (the `reject` policy's max_kv_tokens) or None; scratch: int32 scalar, the last slot
    (an input, not a constant: CPU compile bakes constants into the C++ it builds); slots [m]:
    attention reads the first m slots only (its shape, not its values, matters).
    cfg: (StepConfig, router kind, threads): with threads (an int, not None) the scan step and
    the cache's part run as the extension's operations (`gdn_step`, `extension_part`). Returns
    y [B, 1, D], the new conv, S, entries and count, and score, admitted [B, 1].
    """
    gdn, kind, threads = cfg
    rec, conv, S = gdn_branch(p, x, conv, S, gdn, one_step=True, ext_threads=threads)
    state = (entries, count, positions, tau, cap, scratch)
    if threads is None:
        kv, entries, count, score, admitted = mlx_part(p, x, rec, *state, slots, gdn, kind)
    else:
        kv, entries, count, score, admitted = extension_part(p, x, rec, *state, gdn, kind, threads)
    y = rnn_output(rec, p, gdn) + kv  # [B, 1, HV, Dv]
    y = linear(p["o_proj"], y.astype(x.dtype).reshape(x.shape[0], 1, -1))
    return y, conv, S, entries, count, score, admitted


def mlx_part(p, x, rec, entries, count, positions, tau, cap, scratch, slots, gdn, kind):
    """The step's cache part in MLX operations: score, admit, store, attend, gated norm. Returns
    the attention term [B, 1, HV, Dv], the new entries and count, and score, admitted [B, 1]."""
    q, k, v = rec.q[:, 0], rec.k[:, 0], rec.v[:, 0]  # [B, H, Dk], [B, HV, Dv]
    if kind.learned:
        score = learned_score(p["router"], x)  # [B, 1]
    else:
        score = token_score(head_surprise(rec.v_hat, rec.v, kind))  # [B, 1]
    admitted = admit(score, tau, None, count, cap)
    slot = append_slots(count, admitted, scratch)  # [B, 1]
    entries = scatter_entries(entries, slot, k[:, :, None], v[:, :, None], positions, score)
    count = count + admitted.astype(mx.int32)[:, 0]
    m = slots.shape[0]
    bias = key_bias(entries.scores[:, :m]) if kind.learned else None
    o_kv = buffer_attention(
        q, entries.keys[:, :, :m], entries.values[:, :, :m], count, p["attn_log_scale"],
        p["attn_sink"], bias,
    )  # [B, HV, Dv]  # fmt: skip
    kv = gated_output(o_kv[:, :, None], rec.small[..., 2 * gdn.HV :], p["kv_norm"], gdn.norm_eps)
    return kv, entries, count, score, admitted


def extension_part(p, x, rec, entries, count, positions, tau, cap, scratch, gdn, kind, threads):
    """`mlx_part` as seven operations of the MLX extension (`ops.mlx_ext`): the head score, the
    admission, the four slot writes (in place) and the attention with its gated norm (on up to
    `threads` threads); each row's count bounds the entries it reads. The operations take the
    step's arrays with their token axis ([B, 1, ...]) as they are: no view nodes."""
    ext = mlx_ext.module()
    if kind.learned:
        score = learned_score(p["router"], x)  # [B, 1]
    else:
        score = ext.head_score(rec.v_hat, rec.v, kind.name, EPS)  # [B, 1]
    count, admitted, slot = ext.ham_admit(score, tau, count, scratch, cap)  # [B], [B, 1], [B]
    entries = Entries(
        ext.write_slot(entries.keys, slot, rec.k), ext.write_slot(entries.values, slot, rec.v),
        ext.write_slot(entries.positions, slot, positions),
        ext.write_slot(entries.scores, slot, score),
    )  # fmt: skip
    kv = ext.ham_attend(
        rec.q, entries.keys, entries.values, count, p["attn_log_scale"], p["attn_sink"],
        rec.small[..., 2 * gdn.HV :], p["kv_norm"], entries.scores if kind.learned else None,
        gdn.norm_eps, EPS if kind.learned else None, threads,
    )  # [B, 1, HV, Dv]  # fmt: skip
    return kv, entries, count, score, admitted


class HAMAttention(GatedDeltaNet):
    def __init__(self, args: ModelArgs, threshold: float):
        super().__init__(args)
        D, HV, Dk, Dv = args.hidden_size, args.num_v_heads, args.head_dim, args.head_v_dim
        self.router_kind = get_router(args.ham_router)
        self.kv_gate_proj = nn.Linear(D, HV, bias=False)
        self.kv_norm = nn.RMSNorm(Dv, eps=args.norm_eps)
        self.attn_log_scale = mx.full((HV,), math.log(math.sqrt(Dk)))
        self.attn_sink = mx.zeros((HV,))
        self.threshold = mx.array(threshold, dtype=mx.float32)  # non-trainable buffer
        if self.router_kind.learned:
            self.router = Router(D, args.ham_router_hidden)
        self.freeze(recurse=False, keys=["threshold"])

    def surprise(self, x: mx.array, v: mx.array, v_hat: mx.array, cached: bool = False) -> mx.array:
        """Token score s_t [B, L] float32: min over value heads, or the learned router's r_t.
        cached: a call that fills a cache (see `head_surprise`)."""
        if self.router_kind.learned:
            return self.router(x)
        e = head_surprise(v_hat, v, self.router_kind, cached)
        return mx.stop_gradient(token_score(e))

    def cache_mismatch(self, cache: HAMCache) -> str | None:
        problem = super().cache_mismatch(cache)
        if problem or cache.keys is None:
            return problem
        want = (self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim)
        got = (cache.keys.shape[1], cache.keys.shape[3], cache.values.shape[1],
               cache.values.shape[3])  # fmt: skip
        return None if got == want else f"admitted (H, Dk, HV, Dv) {got}, expected {want}"

    # ---- one-token decode fast path ---------------------------------------------------------
    def small_modules(self) -> list[nn.Module]:
        return super().small_modules() + [self["kv_gate_proj"]]

    def step_linears(self) -> list[nn.Module]:
        router = [self.router.fc1, self.router.fc2] if self.router_kind.learned else []
        return super().step_linears() + [self["kv_gate_proj"], *router]

    def step_params(self, stacked: bool = False) -> dict:
        p = super().step_params(stacked)
        p.update(
            kv_norm=self["kv_norm"]["weight"], attn_log_scale=self["attn_log_scale"],
            attn_sink=self["attn_sink"],
        )  # fmt: skip
        if self.router_kind.learned:
            p["router"] = self.router.parameters()
        return p

    def ext_threads(self, x: mx.array, entries: Entries) -> int | None:
        """The threads the extension (`mlx_ext`) attends on, or None where the step keeps MLX's
        operations (no extension here; a dtype other than float32)."""
        return mlx_ext.threads_for([x, entries.keys, entries.values, self["attn_log_scale"],
                                    self["attn_sink"], self["kv_norm"]["weight"]])  # fmt: skip

    def decode_plan(self, x: mx.array, cache: HAMCache | None, scores=None) -> DecodePlan | None:
        """The one-token step for x [B, 1, D] (`decode_step`), or None where the general path must
        run; its finish updates the cache as `store` does and appends the score to `scores`."""
        if cache is None or x.shape[1] != 1:
            return None
        check_cache(cache, HAMCache, "ham")
        rows = cache.begin(x.shape[0], 1)
        if not self.fast_decode(x, cache, rows) or cache.admission.needs_scores():
            return None
        cap = cache.admission.reject_cap
        cap = None if cap is None else mx.array(cap, dtype=mx.int32)
        H, HV, Dk, Dv = self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim
        k_like = mx.zeros((x.shape[0], H, 1, Dk), dtype=x.dtype)
        v_like = mx.zeros((x.shape[0], HV, 1, Dv), dtype=x.dtype)
        buffer = cache.buffer
        scratch = mx.array(buffer.reserve(k_like, v_like, 1) - 1, dtype=mx.int32)
        conv, S = self.decode_state(x, cache)
        cfg = (self.step_config(), self.router_kind, self.ext_threads(x, buffer.entries))
        # the extension reads each row's count itself: one slots shape, one trace
        slots = attended_slots(buffer.bound + 1, buffer.alloc) if cfg[2] is None else _NO_SLOTS
        tau = cache.admission.tau(self.threshold)

        def finish(outs: list) -> None:
            cache.conv, cache.ssm, entries, count, score, admitted = outs
            buffer.commit(entries, count, 1)
            cache.admission.observe(score, admitted, None)
            cache.advance(rows, 1)
            if scores is not None:
                scores.append(score)

        state = (conv, S, buffer.entries, buffer.count, rows.positions(1), tau, cap, scratch, slots)
        step, params = partial(decode_step, cfg=cfg), self.step_params(stacked=True)
        return DecodePlan(("ham", cfg, cap is None), step, params, state, finish)

    def __call__(
        self, x: mx.array, cache: HAMCache | None = None, scores: list | None = None
    ) -> mx.array:
        plan = self.decode_plan(x, cache, scores)
        return self.general(x, cache, scores) if plan is None else run_plan(plan, x)

    def general(
        self, x: mx.array, cache: HAMCache | None = None, scores: list | None = None
    ) -> mx.array:
        """The general path (any L, padding, quantized layers, GPU kernels, a budget's first
        call)."""
        B, L, _ = x.shape
        H, HV = self.num_heads, self.num_v_heads
        check_cache(cache, HAMCache, "ham")
        rows = None if cache is None else cache.begin(B, L)
        rec = self.recurrence(x, cache, rows)
        score = self.surprise(x, rec.v, rec.v_hat, cache is not None)  # [B, L]
        if scores is not None:
            scores.append(score)
        valid = None if rows is None else rows.valid
        if cache is None:
            admitted = admit(score, self.threshold, None, None, None)
        else:
            tau = cache.admission.tau(self.threshold, score, valid)
            count = cache.buffer.count
            count = mx.zeros((B,), dtype=mx.int32) if count is None else count
            admitted = admit(score, tau, valid, count, cache.admission.reject_cap)

        q = rec.q.transpose(0, 2, 1, 3)  # [B, H, L, Dk]
        k = rec.k.transpose(0, 2, 1, 3)  # [B, H, L, Dk]
        v = rec.v.transpose(0, 2, 1, 3)  # [B, HV, L, Dv]
        gate = rec.small[..., 2 * HV :]  # [B, L, HV] the kv gate's logits
        learned = self.router_kind.learned
        if cache is None:  # training / one-shot forward: masked attention over the sequence
            bias = key_bias(score) if learned else None  # the router's gradient
            if HV != H:
                q, k = mx.repeat(q, HV // H, axis=1), mx.repeat(k, HV // H, axis=1)
            o_kv = admitted_attention(q, k, v, admitted, self.attn_log_scale, self.attn_sink, bias)
            kv_out = gated_output(o_kv, gate, self.kv_norm.weight, self.norm_eps)
        else:  # store the admitted tokens, then attend over the compact cache only
            q_pos = rows.query_positions(L)
            settled = cache.buffer.settled_min()  # slots every row filled before this call
            # prefill on the ops path reads the admissions on the host (one sync), writes the
            # admitted tokens only and attends the filled slots only; a decode step keeps the
            # bound and needs no sync
            exact = L > 1 and not kernels.kernels_enabled()
            cache.store(k, v, mx.stop_gradient(score), admitted, rows, host=exact)
            keys, values, stored, positions, count = cache.fetch(exact)
            bias = key_bias(stored) if learned else None
            kv_out = cached_admitted_attention(
                q, keys, values, count, positions, q_pos, self.attn_log_scale, self.attn_sink,
                bias, gate, self.kv_norm.weight, self.norm_eps, settled,
            )  # fmt: skip
        y = self.rnn_output(rec) + kv_out  # [B, L, HV, Dv]
        return self.o_proj(y.astype(x.dtype).reshape(B, L, -1))

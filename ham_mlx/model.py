"""The language model: embeddings, pre-norm blocks (mixer, SwiGLU MLP), norm, head (spec §5).

Follows mlx-lm's model contract: `Model(args)(inputs [B, L], cache) -> logits [B, L, V]`,
`model.layers`, `model.make_cache()`, an idempotent `model.sanitize(weights)`.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ham_mlx import huge_pages
from ham_mlx.cache import AttnCache, GDNCache, HAMCache
from ham_mlx.config import ModelArgs
from ham_mlx.layers.attention import Attention
from ham_mlx.layers.common import DecodePlan, run_plan
from ham_mlx.layers.gdn import GatedDeltaNet, SharedStack, linear
from ham_mlx.layers.ham import HAMAttention
from ham_mlx.ops import fast_math, mlx_ext

FP32_PARAMS = ("A_log", "dt_bias", "threshold")  # kept in float32 whatever the model dtype
SWIGLU_MIN_TOKENS = 16  # shorter cached calls (decode steps) keep MLX's fused form


class GatedMLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array, cached: bool = False) -> mx.array:
        """x [B, L, D]; cached: a call that fills a cache, which no gradient goes through: on
        the CPU, a long float32 one takes both products as one (the decode step's stacked
        weight) and SiLU(gate) * up as the MLX extension's `swiglu` on several threads."""
        threads = self.swiglu_threads(x) if cached else None
        if threads is None:
            return self.down_proj(fast_math.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = mx.split(linear(self.gate_up(), x), 2, axis=-1)
        return self.down_proj(mlx_ext.module().swiglu(gate, up, threads))

    def plain(self) -> bool:
        """Whether the three layers are plain Linear layers without bias (not quantized)."""
        mlp = (self.gate_proj, self.up_proj, self.down_proj)
        return all(type(m) is nn.Linear and "bias" not in m for m in mlp)

    def gate_up(self) -> mx.array:
        """The gate and up weights stacked [2 * hidden, D] (`SharedStack`: their modules' weights
        then view it)."""
        if "_gate_up" not in self.__dict__:
            self._gate_up = SharedStack()
        return self._gate_up.get([self.gate_proj, self.up_proj])

    def swiglu_threads(self, x: mx.array) -> int | None:
        """Threads for the extension's `swiglu` on x's tokens, or None where the MLX form runs
        (a short call, another dtype, quantized layers, no extension here)."""
        if x.shape[-2] < SWIGLU_MIN_TOKENS or not self.plain():
            return None
        return mlx_ext.threads_for([x])


def block_decode_step(p: dict, h: mx.array, *state, mixer, eps: tuple[float, float]):
    """One token through a whole block as one pure function (compiled: one call per layer and
    token instead of a dozen): norm, the mixer's step, residual, norm, MLP, residual.
    p: {"mixer": the mixer step's params, "block": the norms' and the MLP's weights}."""
    b = p["block"]
    y, *outs = mixer(p["mixer"], mx.fast.rms_norm(h, b["attn_norm"], eps[0]), *state)
    h = h + y
    m = mx.fast.rms_norm(h, b["mlp_norm"], eps[1])
    gate, up = mx.split(linear(b["gate_up"], m), 2, axis=-1)  # one product for both
    return (h + linear(b["down"], fast_math.silu(gate) * up), *outs)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, threshold: float | None):
        super().__init__()
        self.layer_type = layer_type
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        if layer_type == "ham":
            self.attn = HAMAttention(args, threshold)
        elif layer_type == "gdn":
            self.attn = GatedDeltaNet(args)
        else:
            self.attn = Attention(args)
        self.mlp_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size)

    def decode_plan(self, x: mx.array, cache: Any, scores: list | None) -> DecodePlan | None:
        """The whole block's one-token step for x [B, 1, D], where its mixer has one and the
        MLP's layers are plain (unquantized) Linear layers; None otherwise."""
        plan = self.mixer_plan(x, cache, scores)
        return None if plan is None else self.block_plan(plan)

    def mixer_plan(self, x: mx.array, cache: Any, scores: list | None) -> DecodePlan | None:
        """The mixer's one-token step (GDN and HAM layers with a cache), or None."""
        if cache is None or self.layer_type == "attn":
            return None
        return self.attn.decode_plan(x, cache, scores)

    def block_plan(self, plan: DecodePlan) -> DecodePlan | None:
        """The mixer's step wrapped with the norms, the MLP and the residuals (None when the
        MLP's layers are not plain Linear layers)."""
        if not self.mlp.plain():
            return None
        eps = (self.attn_norm.eps, self.mlp_norm.eps)
        weights = {
            "attn_norm": self.attn_norm.weight, "mlp_norm": self.mlp_norm.weight,
            "gate_up": self.mlp.gate_up(), "down": self.mlp.down_proj.weight,
        }  # fmt: skip
        step = partial(block_decode_step, mixer=plan.step, eps=eps)
        params = {"mixer": plan.params, "block": weights}
        return DecodePlan(("block", plan.key, eps), step, params, plan.state, plan.finish)

    def __call__(self, x: mx.array, cache: Any = None, scores: list | None = None) -> mx.array:
        plan = self.mixer_plan(x, cache, scores)  # planned once: the fallbacks reuse it
        block = None if plan is None else self.block_plan(plan)
        if block is not None:
            return run_plan(block, x)
        h = self.attn_norm(x)
        if plan is not None:
            x = x + run_plan(plan, h)
        elif self.layer_type == "ham":
            x = x + self.attn.general(h, cache, scores)
        elif self.layer_type == "gdn":
            x = x + self.attn.general(h, cache)
        else:
            x = x + self.attn(h, cache)
        return x + self.mlp(self.mlp_norm(x), cached=cache is not None)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        thresholds = iter(args.layer_thresholds())
        self.layers = [
            Block(args, t, next(thresholds) if t == "ham" else None) for t in args.layer_types
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(
        self, inputs: mx.array, cache: list[Any] | None = None, scores: list | None = None
    ) -> mx.array:
        h = self.embeddings(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, scores)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.check_token_ids = True  # the trainer turns this off inside compiled steps

    def __call__(
        self, inputs: mx.array, cache: list[Any] | None = None, scores: list | None = None
    ) -> mx.array:
        """inputs [B, L] token ids -> logits [B, L, V].

        `scores`: a list that receives each HAM layer's surprise scores [B, L] (for training's
        threshold control and for inspection)."""
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs.shape}")
        if inputs.shape[1] == 0:
            raise ValueError("inputs are empty: at least one token is needed")
        if self.check_token_ids:
            lo, hi = mx.stack([mx.min(inputs), mx.max(inputs)]).tolist()
            if lo < 0 or hi >= self.args.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range [0, {self.args.vocab_size})")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        h = self.model(inputs, cache, scores)
        if cache is not None and inputs.shape[1] == 1 and "_huge_pages" not in self.__dict__:
            self.weights_on_huge_pages()
        if self.args.tie_word_embeddings:
            return self.model.embeddings.as_linear(h)
        return self.lm_head(h)

    def weights_on_huge_pages(self) -> None:
        """The model's weights onto huge pages, in the background (`huge_pages`): the first
        decode step calls it once, after its stacked weights were built."""
        arrays = [w for _, w in tree_flatten(self.parameters())]
        self.__dict__["_huge_pages"] = huge_pages.advise_in_background(arrays)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    @property
    def ham_layers(self) -> list[HAMAttention]:
        return [b.attn for b in self.layers if b.layer_type == "ham"]

    def make_cache(
        self,
        threshold: float | list[float] | None = None,
        kv_budget: float | list[float] | None = None,
        max_kv_tokens: int | None = None,
        kv_policy: str = "evict",
    ) -> list[Any]:
        """One cache per layer. The controls (spec §7) apply to the HAM layers:

        threshold: one τ for all HAM layers or one per HAM layer, instead of the trained τ;
        kv_budget: a target admitted fraction (one, or one per HAM layer), τ adapts online;
        max_kv_tokens: a cap per layer and row; kv_policy "evict" (lowest score first) or "reject".
        """
        refuse_mlx_lm_max_kv_size()
        n_ham = len(self.ham_layers)
        thresholds = per_layer(threshold, n_ham, "threshold")
        budgets = per_layer(kv_budget, n_ham, "kv_budget")
        caches: list[Any] = []
        i = 0
        for b in self.layers:
            if b.layer_type == "ham":
                caches.append(HAMCache(thresholds[i], budgets[i], max_kv_tokens, kv_policy))
                i += 1
            elif b.layer_type == "gdn":
                caches.append(GDNCache())
            else:
                caches.append(AttnCache(window=b.attn.window))
        return caches

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint weights to this model's layout; applying it twice changes nothing."""
        out = {}
        for key, w in weights.items():
            if "rotary" in key or key.endswith("inv_freq"):
                continue
            if self.args.tie_word_embeddings and key == "lm_head.weight":
                continue
            if "conv1d.weight" in key and w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1:
                w = w.transpose(0, 2, 1)  # torch [C, 1, Kc] -> MLX [C, Kc, 1]
            if key.split(".")[-1] in FP32_PARAMS:
                w = w.astype(mx.float32)
            out[key] = w
        return out

    def cast(self, dtype: mx.Dtype) -> Model:
        """Cast floating parameters to dtype, keeping A_log, dt_bias and threshold in float32."""
        self.set_dtype(dtype)
        for layer in self.layers:
            for name in FP32_PARAMS:
                if name in layer.attn:
                    layer.attn[name] = layer.attn[name].astype(mx.float32)
        return self

    def thresholds(self) -> list[float]:
        return [float(m.threshold) for m in self.ham_layers]


def refuse_mlx_lm_max_kv_size() -> None:
    """mlx-lm's `make_prompt_cache(model, max_kv_size)` calls `model.make_cache()` without
    passing `max_kv_size` on. Read it from that caller, so that it is refused, not ignored."""
    caller = sys._getframe(2)
    if caller.f_globals.get("__name__") == "mlx_lm.models.cache":
        size = caller.f_locals.get("max_kv_size")
        if size is not None:
            raise ValueError(
                f"max_kv_size={size}: ham_mlx models do not use mlx-lm's rotating KV cache; cap "
                "the HAM caches with max_kv_tokens instead (ham-mlx generate --max-kv-tokens N, "
                "or model.make_cache(max_kv_tokens=N))"
            )


def per_layer(value: Any, n: int, name: str) -> list[Any]:
    """One value per HAM layer from a scalar, a list of n, or None."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values given for {n} HAM layers")
        return list(value)
    return [value] * n

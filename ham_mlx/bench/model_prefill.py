"""Whole-model prefill tokens/s against prompt length, and the matmul roofline.

Contenders (same width, depth, MLP and vocab; random weights; float32; batch 1):
- `gdn`: all Gated DeltaNet layers.
- `ham-10%`, `ham-25%`: all HAM layers, each layer's τ fixed at the value that admits that
  fraction of the timed prompt itself (`calibrated_thresholds`, untimed): a trained model has a
  fixed τ, and the scores of a random-weights model drift along the prompt, so a τ calibrated on
  another prompt or length would admit another fraction. The fraction reported is the one
  measured in the cache.
- `gdn (mlx-lm)`: mlx-lm's own Gated DeltaNet model (`qwen3_5`, every layer linear attention),
  the same widths as `gdn`, up to --peer-max-length tokens.

Every run starts from an empty cache and feeds the prompt in chunks of --prefill-step-size,
evaluating each chunk's logits and cache. Rounds interleave the contenders in rotating order, so
that a slow moment of a shared machine hits all of them alike; figures are medians.

Roofline: the FLOPs of the model's weight products (2 per weight and token: projections, MLP and
head; not the scan's or the attention's own products) over the probe's matmul GFLOP/s, against
the measured time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ham_mlx.admission import quantile_threshold
from ham_mlx.bench.contenders import decode_args, qwen3_5_gdn_model
from ham_mlx.buffer_cache import release_between_chunks
from ham_mlx.cache import kv_stats
from ham_mlx.model import Model


def calibrated_thresholds(model: Model, tokens: mx.array, fraction: float) -> list[float]:
    """Each HAM layer's τ that admits `fraction` of the prompt tokens [1, T]: one call with
    kv_budget, whose first call sets each layer's τ from that layer's own scores (which depend
    only on the layers before it); the same τ, fixed, then admits the same tokens."""
    scores: list[mx.array] = []
    model(tokens, model.make_cache(kv_budget=fraction), scores)
    return [float(quantile_threshold(s, fraction)[0]) for s in scores]


@dataclass
class Prefiller:
    name: str
    kind: str  # "gdn", "ham", "mlx-lm"
    model: Any
    make_cache: Callable[..., list[Any]]  # HAM: make_cache(threshold=[τ per layer])
    product_weights: int  # weights multiplied once per token
    target_fraction: float | None = None
    max_length: int | None = None
    thresholds: dict[int, list[float]] = field(default_factory=dict)  # by prompt length

    def cache_for(self, tokens: mx.array) -> list[Any]:
        """An empty cache; HAM: τ calibrated on this prompt (once per length)."""
        if self.target_fraction is None:
            return self.make_cache()
        T = tokens.shape[1]
        if T not in self.thresholds:
            self.thresholds[T] = calibrated_thresholds(self.model, tokens, self.target_fraction)
        return self.make_cache(threshold=self.thresholds[T])

    def run(self, tokens: mx.array, chunk: int) -> tuple[float, float | None]:
        """Prefill tokens [1, T] from an empty cache: (seconds, measured cached fraction)."""
        cache = self.cache_for(tokens)
        t = time.perf_counter()
        for i in range(0, tokens.shape[1], chunk):
            part = tokens[:, i : i + chunk]
            logits = self.model(part, cache=cache) if self.kind == "mlx-lm" else self.model(
                part, cache
            )  # fmt: skip
            mx.eval(logits, [c.state for c in cache])
            release_between_chunks()  # as both generation loops do
        seconds = time.perf_counter() - t
        if self.kind != "ham":
            return seconds, None
        stats = [s for s in kv_stats(cache) if s["type"] == "ham"]
        return seconds, statistics.mean(s["kv_fraction"][0] for s in stats)


def product_weights(model: Any, embedding_key: str, tied: bool) -> int:
    """Weights of the 2-D products a token goes through (the embedding only as a tied head)."""
    n = 0
    for key, w in tree_flatten(model.parameters()):
        if w.ndim != 2 or (key.endswith(embedding_key) and not tied):
            continue
        n += w.size
    return n


def build_prefillers(
    preset: str, vocab_size: int, fractions: list[float], with_mlx_lm: bool,
    peer_max_length: int, seed: int = 0,
) -> list[Prefiller]:  # fmt: skip
    mx.random.seed(seed)
    out = []
    gdn_args = decode_args(preset, vocab_size, "gdn")
    tied = gdn_args.tie_word_embeddings
    emb = "embeddings.weight"
    gdn = Model(gdn_args)
    mx.eval(gdn.parameters())
    out.append(Prefiller("gdn", "gdn", gdn, gdn.make_cache, product_weights(gdn, emb, tied)))
    ham = Model(decode_args(preset, vocab_size, "ham"))
    mx.eval(ham.parameters())
    for f in fractions:
        out.append(Prefiller(
            f"ham-{f:.0%}", "ham", ham, ham.make_cache, product_weights(ham, emb, tied), f
        ))  # fmt: skip
    if with_mlx_lm:
        from mlx_lm.models.cache import make_prompt_cache

        peer = qwen3_5_gdn_model(gdn_args)
        mx.eval(peer.parameters())
        n = product_weights(peer, "embed_tokens.weight", tied)
        out.append(Prefiller("gdn (mlx-lm)", "mlx-lm", peer, lambda: make_prompt_cache(peer), n,
                             max_length=peer_max_length))  # fmt: skip
    return out


def run_model_prefill(
    prefillers: list[Prefiller],
    lengths: list[int],
    repeats: int,
    chunk: int,
    vocab_size: int,
    gflops: float | None,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed + 1)
    stream = mx.array(rng.integers(0, vocab_size, size=(1, max(lengths))), dtype=mx.int32)
    rows = []
    for T in sorted(lengths):
        tokens = stream[:, :T]
        active = [p for p in prefillers if p.max_length is None or T <= p.max_length]
        samples: dict[str, list[float]] = {p.name: [] for p in active}
        fraction: dict[str, float | None] = {}
        for p in active:  # warm-up (and MLX's compiled steps)
            p.run(tokens[:, : min(T, 2 * chunk)], chunk)
        for k in range(max(repeats, 1)):
            k %= len(active)
            for p in [*active[k:], *active[:k]]:
                sec, fraction[p.name] = p.run(tokens, chunk)
                samples[p.name].append(sec)
        for p in active:
            sec = statistics.median(samples[p.name])
            flops = 2.0 * p.product_weights * T
            row = {
                "T": T, "model": p.name, "kind": p.kind, "target_fraction": p.target_fraction,
                "kv_fraction": fraction[p.name], "tok_s": T / sec, "seconds": sec,
                "samples_s": samples[p.name], "chunk": chunk, "product_flops": flops,
                "roofline_fraction": None if not gflops else flops / (gflops * 1e9) / sec,
            }  # fmt: skip
            rows.append(row)
            fr = "" if row["kv_fraction"] is None else f" cached {row['kv_fraction']:.3f}"
            roof = "" if row["roofline_fraction"] is None else (
                f" roofline {row['roofline_fraction']:.0%}"
            )  # fmt: skip
            log(f"  prefill {p.name:<14} T={T:>6}: {T / sec:8.1f} tok/s{fr}{roof}")
    return rows

"""Samplers of the batched engine: one per request, so that rows of a batch sample independently.

They follow `ham_mlx.sample.make_sampler` (temperature, then top-k, top-p, min-p), on the
log-probabilities that mlx-lm's BatchGenerator hands them (logits minus a constant per row: the
same distribution). A request with a `seed` draws from its own key sequence, exactly the one
`mx.random.seed(seed)` starts for a request generated alone (`ham_mlx.generate`), so a seeded
request gives its serial answer whatever else runs in the batch. Without a seed, MLX's global
generator is used.
"""

from __future__ import annotations

import mlx.core as mx

from ham_mlx.sample import Sampler, apply_min_p, apply_top_k, apply_top_p, make_sampler


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token; one shared object, so a batch of greedy rows samples in one call."""
    return mx.argmax(logprobs, axis=-1)


class SeededSampler:
    """`make_sampler`'s draw with a key sequence of its own (mx.random.seed's)."""

    def __init__(self, seed: int, temperature: float, top_p: float, top_k: int, min_p: float):
        make_sampler(temperature, top_p, top_k, min_p)  # the same checks
        self.key = mx.random.key(seed)
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p

    def __call__(self, logits: mx.array) -> mx.array:
        keys = mx.random.split(self.key)
        self.key, key = keys[0], keys[1]
        logits = logits.astype(mx.float32)
        if self.top_k > 0:
            logits = apply_top_k(logits, self.top_k)
        if self.top_p < 1:
            logits = apply_top_p(logits, self.top_p)
        if self.min_p > 0:
            logits = apply_min_p(logits, self.min_p)
        return mx.random.categorical(logits * (1 / self.temperature), axis=-1, key=key)


def sampler_for(
    temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None
) -> Sampler:
    if temperature == 0:
        return greedy
    if seed is None:
        return make_sampler(temperature, top_p, top_k, min_p)
    return SeededSampler(seed, temperature, top_p, top_k, min_p)

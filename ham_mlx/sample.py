"""Token samplers and logits processors.

Everything here is built from MLX ops only (no `.item()`, no numpy), so a sampler can run inside
the decode loop without synchronising with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` largest logits of each row `[B, V]`; set the rest to -inf."""
    if top_k >= logits.shape[-1]:
        return logits
    dropped = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., top_k:]  # [B, V - k]
    return mx.put_along_axis(logits, dropped, mx.array(-mx.inf, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability sum reaches `top_p`."""
    order = mx.argsort(-logits, axis=-1)  # [B, V], most likely first
    probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # the top token has 0 before it: always kept
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    kept = mx.where(mass_before < top_p, sorted_logits, -mx.inf)
    return mx.put_along_axis(logits, order, kept.astype(logits.dtype), axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    top = mx.max(logits, axis=-1, keepdims=True)  # p / p_top = exp(logit - top)
    return mx.where(logits - top >= math.log(min_p), logits, -mx.inf)


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """A function from logits `[B, V]` to token ids `[B]` (uint32).

    `temperature` 0 picks the most likely token. Otherwise the candidates are narrowed by top-k
    (0: off), then top-p (1.0: off), then min-p (0: off), each judged on the probabilities
    `softmax(logits)` of the tokens still in, and one is drawn from
    `softmax(logits / temperature)` over what is left, with MLX's global PRNG (`mx.random.seed`).
    """
    _check(temperature >= 0, "temperature", temperature, ">= 0")
    _check(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
    _check(isinstance(top_k, int) and top_k >= 0, "top_k", top_k, "an int >= 0")
    _check(0 <= min_p < 1, "min_p", min_p, "in [0, 1)")

    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if top_k > 0:
            logits = apply_top_k(logits, top_k)
        if top_p < 1:
            logits = apply_top_p(logits, top_p)
        if min_p > 0:
            logits = apply_min_p(logits, min_p)
        return mx.random.categorical(logits * (1 / temperature), axis=-1)

    return sample


def apply_repetition_penalty(logits: mx.array, context: mx.array, penalty: float) -> mx.array:
    """Penalise tokens that appear in `context` `[B, n]` (CTRL, Keskar et al. 2019).

    A present token's logit becomes `logit / penalty` when positive, `logit * penalty` otherwise.
    """
    _check(penalty > 0, "repetition_penalty", penalty, "> 0")
    if context.size == 0:
        return logits
    if context.ndim == 1:
        context = context[None]
    context = mx.broadcast_to(context, (logits.shape[0], context.shape[-1]))  # [B, n]
    seen = mx.take_along_axis(logits, context, axis=-1)
    seen = mx.where(seen > 0, seen / penalty, seen * penalty)
    return mx.put_along_axis(logits, context, seen.astype(logits.dtype), axis=-1)


def make_logits_processors(
    repetition_penalty: float | None = None, context_size: int = 64
) -> list[LogitsProcessor]:
    """Processors `(tokens [B, n], logits [B, V]) -> logits` to apply before sampling.

    The repetition penalty looks at the last `context_size` tokens; None or 1.0 turns it off.
    """
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        _check(repetition_penalty > 0, "repetition_penalty", repetition_penalty, "> 0")
        _check(context_size > 0, "context_size", context_size, "> 0")

        def repetition(tokens: mx.array, logits: mx.array) -> mx.array:
            context = tokens[..., -context_size:]
            return apply_repetition_penalty(logits, context, repetition_penalty)

        processors.append(repetition)
    return processors

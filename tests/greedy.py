"""Greedy continuations that allow for near-ties.

Two correct paths through one model (a whole prompt in one call against a prompt in chunks, a
batch step against a single one, a padded batch row against the row alone) round differently, so
their logits differ by a few units in the last place: 0.008 at 8-16 in float16. Where the two most
likely next tokens are closer than that, either one is a correct greedy choice, and an exact
comparison of the two paths' tokens would test the rounding, not the path.

`tie_aware_greedy` decodes greedily with a reference model, but where the answer under test took
a token whose logit is within `TIE` of the largest, it follows that token. The result equals the
answer under test exactly when that answer is a greedy continuation up to ties; a wrong token (one
clearly below the largest logit) is not followed, so the comparison still fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TIE = 0.05  # logits this close to the largest are ties: a few units in float16's last place
CANDIDATES = 64  # the most likely tokens looked at for a tie


def argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def tie_aware_greedy(
    next_logits: Callable[[list[int]], np.ndarray],
    head: Sequence[int],
    max_tokens: int,
    follows: Callable[[list[int]], bool],
    eos: int | None = None,
    draw: Callable[[np.ndarray], int] = argmax,
    tie: float = TIE,
) -> list[int]:
    """Up to max_tokens tokens after head, each draw(logits) of next_logits(ids) (the logits [V]
    of the token after ids; draw: the largest, or a sampler's draw), except where the answer under
    test went on with a token t that draw picks once t's logit is raised by `tie`: then t.
    follows(tokens) says whether the answer under test begins with tokens."""
    ids: list[int] = []
    for _ in range(max_tokens):
        logits = np.asarray(next_logits([*head, *ids]), dtype=np.float32)
        token = best = draw(logits)
        if not follows([*ids, best]):
            for t in np.argsort(-logits)[:CANDIDATES].tolist():
                if t == best or not follows([*ids, t]):
                    continue
                raised = logits.copy()
                raised[t] += tie
                if draw(raised) == t:
                    token = t
                    break
        ids.append(token)
        if token == eos:
            break
    return ids


def is_prefix(tokens: list[int], whole: Sequence[int]) -> bool:
    return list(whole[: len(tokens)]) == tokens


def mlx_next_logits(model) -> Callable[[list[int]], np.ndarray]:
    """The logits after ids from a ham_mlx model's parallel forward (no cache)."""
    import mlx.core as mx

    def next_logits(ids: list[int]) -> np.ndarray:
        return np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))

    return next_logits


def onnx_next_logits(model, capacity: int) -> Callable[[list[int]], np.ndarray]:
    """The logits after ids from an exported model (ham_mlx.export.runtime.OnnxModel), alone."""

    def next_logits(ids: list[int]) -> np.ndarray:
        return model(np.array([ids], dtype=np.int64), model.make_cache(1, capacity))[0, -1]

    return next_logits


class SeededDraws:
    """The draws of a seeded sampler, step after step: `next_logits` gives a step's logits (after
    top-p) and moves to the step's key, the next one of the sequence `mx.random.seed(seed)`
    starts (one split per token); `draw` is `mx.random.categorical` under that key."""

    def __init__(self, model, seed: int, temperature: float, top_p: float):
        import mlx.core as mx

        self.model, self.temperature, self.top_p = model, temperature, top_p
        self.key = mx.random.key(seed)
        self.step_key = None

    def next_logits(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        from ham_mlx.sample import apply_top_p

        self.key, self.step_key = mx.random.split(self.key)
        logits = self.model(mx.array([ids]))[:, -1].astype(mx.float32)  # [1, V]
        if self.top_p < 1:
            logits = apply_top_p(logits, self.top_p)
        return np.array(logits)[0]

    def draw(self, logits: np.ndarray) -> int:
        import mlx.core as mx

        scaled = mx.array(logits[None]) * (1 / self.temperature)
        return int(mx.random.categorical(scaled, key=self.step_key).item())

"""Prefix reuse between requests: snapshots of a request's caches after some of its tokens.

HAM and GDN caches hold a recurrent state that cannot be rewound (`trim`), so a snapshot is
reusable only when its whole token sequence is a prefix of a later prompt; the later request
then runs only the rest of its prompt. Snapshots are copies (`copy.deepcopy` of one-row caches):
a snapshot is never handed out, only copies of it, so nothing a request does can change it.

Where snapshots are taken (by the engine):
- after a prompt's tokens but the last one (what a repeated prompt, or the same prompt with more
  text after it, can reuse), and at the end of a request (prompt + reply: a follow-up turn);
- at a divergence point: when a new prompt shares a prefix with a recent prompt (the same
  context with another question or answer choice) and no snapshot covers that prefix yet, the
  prompt is run in two parts and the state after the shared part is kept for the next ones.

A snapshot made while scoring a prompt (echo with logprobs) also keeps the log-probabilities of
its tokens and of the token after it, so that a later scoring request can reuse it too.

Snapshots are kept in least-recently-used order within a budget of bytes (`cache.nbytes` of every
layer plus the kept log-probabilities). Controls that change how a prompt's tokens are admitted
depending on how the prompt is split into calls (kv_budget's online τ, max_kv_tokens with
`evict`) make a request's output depend on the split, so such requests neither use nor make
snapshots: output is identical with and without reuse.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

MIN_SHARED = 4  # a divergence point must save at least this many tokens


@dataclass
class PromptScores:
    """Log-probabilities of a snapshot's tokens 1..s-1 (token 0 has none), their `depth` most
    likely alternatives, and the full distribution of the token after the snapshot."""

    chosen: np.ndarray  # [s-1] float32
    top_ids: np.ndarray  # [s-1, depth] int32, most likely first
    top_logprobs: np.ndarray  # [s-1, depth] float32
    last: np.ndarray  # [V] float32: log-probabilities of the next token

    @property
    def depth(self) -> int:
        return self.top_ids.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.chosen, self.top_ids, self.top_logprobs, self.last))


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    cache: list[Any]  # one row per layer; never mutated: use `copy_cache`
    scores: PromptScores | None
    nbytes: int

    def copy_cache(self) -> list[Any]:
        return copy.deepcopy(self.cache)


class PrefixCache:
    """Snapshots keyed by (controls, tokens), LRU within `max_bytes`; 0 turns reuse off."""

    def __init__(self, max_bytes: int, recent: int = 64):
        self.max_bytes = max_bytes
        self._snapshots: OrderedDict[tuple, Snapshot] = OrderedDict()
        self._lengths: dict[tuple, dict[int, int]] = {}  # controls -> {length: snapshots}
        self._recent: deque[tuple[tuple, np.ndarray]] = deque(maxlen=recent)
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._snapshots)

    def lookup(self, key: tuple, prompt: list[int], depth: int | None = None) -> Snapshot | None:
        """The longest snapshot whose tokens are a strict prefix of prompt (at least one token
        is left to run); with `depth`, only snapshots with scores at least that deep."""
        if not self.enabled:
            return None
        for n in sorted(self._lengths.get(key, {}), reverse=True):
            if n >= len(prompt):
                continue
            found = self._snapshots.get((key, tuple(prompt[:n])))
            if found is None or (depth is not None and (
                found.scores is None or found.scores.depth < depth
            )):  # fmt: skip
                continue
            self._snapshots.move_to_end((key, found.tokens))
            self.hits += 1
            self.reused_tokens += n
            return found
        return None

    def has(self, key: tuple, tokens: list[int] | tuple[int, ...]) -> bool:
        return (key, tuple(tokens)) in self._snapshots

    def store(
        self, key: tuple, tokens: list[int], cache: list[Any], scores: PromptScores | None = None
    ) -> None:
        """Keep a copy of cache (after `tokens`) unless an equal or better snapshot is kept."""
        if not self.enabled or not tokens:
            return
        tokens = tuple(tokens)
        old = self._snapshots.get((key, tokens))
        if old is not None and (scores is None or (
            old.scores is not None and old.scores.depth >= scores.depth
        )):  # fmt: skip
            self._snapshots.move_to_end((key, tokens))
            return
        cache = copy.deepcopy(cache)
        mx.eval([c.state for c in cache])
        nbytes = sum(c.nbytes for c in cache) + (0 if scores is None else scores.nbytes)
        if nbytes > self.max_bytes:
            return
        if old is not None:
            self._drop((key, tokens))
        self._snapshots[(key, tokens)] = Snapshot(tokens, cache, scores, nbytes)
        lengths = self._lengths.setdefault(key, {})
        lengths[len(tokens)] = lengths.get(len(tokens), 0) + 1
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._snapshots)))

    def _drop(self, k: tuple) -> None:
        s = self._snapshots.pop(k)
        self.nbytes -= s.nbytes
        lengths = self._lengths[k[0]]
        lengths[len(s.tokens)] -= 1
        if not lengths[len(s.tokens)]:
            del lengths[len(s.tokens)]

    def divergence(self, key: tuple, prompt: list[int], start: int) -> int | None:
        """A point worth a snapshot inside prompt[start:-1]: the longest prefix prompt shares
        with a recent prompt, when no snapshot covers it yet. Remembers prompt as recent."""
        if not self.enabled:
            return None
        ids = np.asarray(prompt, dtype=np.int64)
        best = 0
        for k, other in self._recent:
            n = min(len(other), len(ids))
            if k != key or n <= best:
                continue
            differ = np.flatnonzero(other[:n] != ids[:n])
            best = max(best, int(differ[0]) if len(differ) else n)
        self._recent.append((key, ids))
        if start + MIN_SHARED <= best < len(prompt) - 1 and not self.has(key, prompt[:best]):
            return best
        return None

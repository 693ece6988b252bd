"""Perplexity of a token sequence, fed through the model's caches in chunks as `generate`
prefills a prompt, so that it measures the model as it runs (HAM: only admitted tokens in the
KV cache), and the admitted fraction each HAM layer reached."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ham_mlx.eval.runner import Runner, log_softmax, progress_bar


def perplexity(
    runner: Runner, ids: np.ndarray | list[int], chunk: int = 512, progress: bool = False
) -> dict[str, Any]:
    """Mean negative log-likelihood (nats/token) of ids[1:] given the ids before them.

    ids [n], n >= 2. Returns tokens (scored), nats_per_token, perplexity, kv_fraction (one per
    HAM layer, over the n - 1 tokens fed), chunk."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    inputs, targets = ids[:-1], ids[1:]
    n = inputs.size
    cache = runner.make_cache(1, n)
    nll = 0.0
    bar = progress_bar(n, progress, "ppl", "tok")
    for i in range(0, n, chunk):
        logp = log_softmax(runner.logits(inputs[None, i : i + chunk], cache)[0])  # [l, V]
        t = targets[i : i + chunk]
        nll -= float(logp[np.arange(t.size), t].sum())
        if bar is not None:
            bar.update(t.size)
    if bar is not None:
        bar.close()
    mean = nll / n
    return {
        "tokens": int(n), "nats_per_token": mean, "bits_per_token": mean / math.log(2),
        "perplexity": math.exp(mean), "kv_fraction": runner.kv_fraction(cache), "chunk": chunk,
    }  # fmt: skip

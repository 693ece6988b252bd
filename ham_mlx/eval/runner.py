"""One interface over an MLX model and an exported ONNX model: make a cache, feed token ids
through it in chunks (the way `generate` prefills), read each HAM layer's admitted fraction."""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from ham_mlx.buffer_cache import release_between_chunks
from ham_mlx.cache import kv_stats


class Runner(Protocol):
    vocab_size: int

    def make_cache(self, batch: int, capacity: int) -> Any: ...

    def logits(self, ids: np.ndarray, cache: Any) -> np.ndarray:
        """ids [B, L] int -> float32 logits [B, L, V]; the cache advances by L."""
        ...

    def kv_fraction(self, cache: Any) -> list[float]:
        """Admitted fraction of every HAM layer, mean over rows."""
        ...


def ham_fractions(stats: list[dict[str, Any]]) -> list[float]:
    rows = [s["kv_fraction"] for s in stats if s["type"] == "ham"]
    return [float(np.mean(r)) if r else 0.0 for r in rows]


class MLXRunner:
    def __init__(self, model, controls: dict[str, Any] | None = None):
        self.model, self.controls = model, dict(controls or {})
        self.vocab_size = model.args.vocab_size

    def make_cache(self, batch: int, capacity: int) -> list[Any]:
        return self.model.make_cache(**self.controls)

    def logits(self, ids: np.ndarray, cache: list[Any]) -> np.ndarray:
        out = self.model(mx.array(np.asarray(ids, dtype=np.int32)), cache)
        out = out.astype(mx.float32)
        mx.eval(out, [c.state for c in cache])
        out = np.array(out)
        release_between_chunks()
        return out

    def kv_fraction(self, cache: list[Any]) -> list[float]:
        return ham_fractions(kv_stats(cache))


class OnnxRunner:
    def __init__(self, model):
        self.model = model
        self.vocab_size = model.args.vocab_size

    def make_cache(self, batch: int, capacity: int) -> Any:
        return self.model.make_cache(batch=batch, capacity=capacity)

    def logits(self, ids: np.ndarray, cache: Any) -> np.ndarray:
        return np.asarray(self.model(np.asarray(ids, dtype=np.int64), cache), dtype=np.float32)

    def kv_fraction(self, cache: Any) -> list[float]:
        return ham_fractions(cache.stats())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] float32 -> log-probabilities, in float64 for the sums that follow."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy(runner: Runner, ids: list[int], new_tokens: int, chunk: int, cache: Any) -> list[int]:
    """Prefill `ids` in chunks of `chunk`, then decode `new_tokens` tokens by argmax."""
    prompt = np.asarray(ids, dtype=np.int64)[None]
    for i in range(0, prompt.shape[1], chunk):
        last = runner.logits(prompt[:, i : i + chunk], cache)[0, -1]
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(last))
        out.append(token)
        last = runner.logits(np.array([[token]]), cache)[0, -1]
    return out


def progress_bar(total: int, enabled: bool, desc: str, unit: str):
    """A tqdm bar on stderr, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)

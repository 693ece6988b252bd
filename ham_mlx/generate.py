"""Text generation: chunked prefill, sampling, streaming, and HAM memory statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.buffer_cache import release_between_chunks
from ham_mlx.cache import kv_stats
from ham_mlx.model import Model
from ham_mlx.sample import make_logits_processors, make_sampler
from ham_mlx.tokenizer import Tokenizer


@dataclass
class GenerationResponse:
    """One streamed piece of text with the running statistics."""

    text: str  # new text since the previous response
    token: int | None  # the token just generated (None on the final flush)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    kv: list[dict[str, Any]] = field(default_factory=list)  # kv_stats of the cache
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_tokens) or None

    @property
    def kv_fraction(self) -> list[float]:
        """Admitted fraction of every HAM layer (mean over rows)."""
        return [
            sum(s["kv_fraction"]) / max(len(s["kv_fraction"]), 1)
            for s in self.kv
            if s["type"] == "ham"
        ]

    def summary(self) -> str:
        ham = [s for s in self.kv if s["type"] == "ham"]
        kv_bytes = sum(s["kv_bytes"] for s in self.kv)
        full = sum(s["full_kv_bytes"] for s in self.kv)
        parts = [
            f"prompt {self.prompt_tokens} tok {self.prompt_tps:.1f} tok/s",
            f"generation {self.generation_tokens} tok {self.generation_tps:.1f} tok/s",
            f"peak {self.peak_memory_gb:.3f} GB",
        ]
        if ham:
            counts = "/".join(str(sum(s["admitted"])) for s in ham)
            fracs = "/".join(f"{f:.2f}" for f in self.kv_fraction)
            parts.append(f"admitted {counts} (fraction {fracs})")
        if full:
            parts.append(f"KV {kv_bytes / 1024:.1f} KiB vs full {full / 1024:.1f} KiB")
        return " | ".join(parts)


def generate_step(
    model: Model,
    prompt: Sequence[int],
    cache: list[Any],
    sampler: Callable[[mx.array], mx.array],
    logits_processors: list[Callable[[mx.array, mx.array], mx.array]],
    prefill_step_size: int = 512,
) -> Iterator[tuple[int, float, float]]:
    """Yield (token, prefill start, prefill end) forever; the prompt is fed in chunks."""
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size={prefill_step_size} must be >= 1")
    tokens = mx.array(list(prompt), dtype=mx.int32)[None]  # [1, n]
    start = time.perf_counter()
    n = tokens.shape[1]
    for i in range(0, n, prefill_step_size):
        logits = model(tokens[:, i : i + prefill_step_size], cache)
        last = i + prefill_step_size >= n
        mx.eval([logits, *(c.state for c in cache)] if last else [c.state for c in cache])
        release_between_chunks()
    logits = logits[:, -1, :]
    prefill_end = time.perf_counter()
    history = tokens
    while True:
        for proc in logits_processors:
            logits = proc(history, logits)
        y = sampler(logits)  # [1]
        mx.eval(y)
        token = int(y.item())
        yield token, start, prefill_end
        if logits_processors:
            history = mx.concatenate([history, y.astype(mx.int32)[None]], axis=1)
        logits = model(y.astype(mx.int32)[None], cache)[:, -1, :]


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as token ids: text (valid Unicode) or a sequence of integer ids in
    [0, vocab_size); anything else is refused with a ValueError naming the value."""
    if isinstance(prompt, str):
        check_text(prompt)
        ids = tokenizer.encode(prompt) if prompt else []
    else:
        ids = token_ids(prompt, vocab_size)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    return ids


def check_text(text: str) -> None:
    """Text that can be encoded: no lone surrogates (what undecodable bytes become)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the prompt is not valid Unicode: {text[e.start]!r} at character {e.start} is a "
            "lone surrogate (undecodable input?)"
        ) from None


def token_ids(prompt: object, vocab_size: int) -> list[int]:
    """A sequence of token ids (a list, tuple, or 1-d integer array) as a list of ints."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ValueError(
            f"the prompt is {type(prompt).__name__}: give text (str; decode it first) or a "
            "sequence of token ids"
        )
    if isinstance(prompt, (mx.array, np.ndarray)):
        integer = (mx.issubdtype(prompt.dtype, mx.integer) if isinstance(prompt, mx.array)
                   else np.issubdtype(prompt.dtype, np.integer))  # fmt: skip
        if prompt.ndim != 1 or not integer:
            raise ValueError(f"prompt token ids: a {prompt.ndim}-d {prompt.dtype} array; give a "
                             "1-d integer array")  # fmt: skip
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise ValueError(f"the prompt is a {type(prompt).__name__}: give text (str) or a "
                         "sequence of token ids")  # fmt: skip
    ids = []
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"prompt token {i} is {t!r}, not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt token id {t} is out of range [0, {vocab_size})")
        ids.append(int(t))
    return ids


def check_seed(seed: object) -> None:
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
        or not 0 <= seed < 2**64
    ):  # fmt: skip
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**64)")


def stream_responses(
    steps: Iterator[tuple[int, float, float]],
    tokenizer: Tokenizer,
    prompt_tokens: int,
    max_tokens: int,
    kv: Callable[[], list[dict[str, Any]]],
    peak_memory_gb: Callable[[], float],
) -> Iterator[GenerationResponse]:
    """Turn (token, prefill start, prefill end) steps into streamed text with statistics,
    stopping on EOS or after max_tokens. Shared by the MLX and the onnxruntime generators."""
    detok = tokenizer.detokenizer()
    eos = tokenizer.eos_id

    def response(text: str, token: int | None, n: int, start: float, t0: float, reason):
        prefill = t0 - start
        elapsed = time.perf_counter() - t0
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / prefill if prefill > 0 else 0.0,
            generation_tokens=n,
            generation_tps=n / elapsed if elapsed > 0 else 0.0,
            peak_memory_gb=peak_memory_gb(),
            kv=kv(),
            finish_reason=reason,
        )

    if max_tokens == 0:
        _, start, t0 = next(steps)
        yield response("", None, 0, start, t0, "length")
        return
    for n, (token, start, t0) in enumerate(steps, start=1):
        if token == eos:
            yield response(detok.finalize(), token, n, start, t0, "stop")
            return
        text = detok.add_token(token)
        if n >= max_tokens:
            yield response(text + detok.finalize(), token, n, start, t0, "length")
            return
        yield response(text, token, n, start, t0, None)


def collect(stream: Iterator[GenerationResponse], verbose: bool = False) -> str:
    """The whole text of a stream (printed as it comes, with the statistics, when verbose)."""
    pieces = []
    last = None
    for last in stream:
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print("\n" + last.summary())
    return "".join(pieces)


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    seed: int | None = None,
    threshold: float | list[float] | None = None,
    kv_budget: float | list[float] | None = None,
    max_kv_tokens: int | None = None,
    kv_policy: str = "evict",
    prefill_step_size: int = 512,
    prompt_cache: list[Any] | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from a prompt (text, or token ids), yielding pieces of text with statistics.

    The HAM controls (spec §7): `threshold` replaces the trained τ (lower keeps more tokens:
    better recall, more memory), `kv_budget` holds a target admitted fraction by adapting τ online,
    `max_kv_tokens` caps each layer's cache (`kv_policy` "evict" drops the lowest-scoring entries,
    "reject" refuses new tokens once full).
    """
    ids = prompt_ids(tokenizer, prompt, model.args.vocab_size)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 0")
    check_seed(seed)
    if seed is not None:
        mx.random.seed(int(seed))
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = make_logits_processors(repetition_penalty, repetition_context_size)
    cache = prompt_cache
    if cache is None:
        cache = model.make_cache(threshold, kv_budget, max_kv_tokens, kv_policy)
    mx.reset_peak_memory()
    steps = generate_step(model, ids, cache, sampler, processors, prefill_step_size)
    yield from stream_responses(
        steps, tokenizer, len(ids), max_tokens,
        kv=lambda: kv_stats(cache), peak_memory_gb=lambda: mx.get_peak_memory() / 1e9,
    )  # fmt: skip


def generate(
    model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], verbose: bool = False, **kwargs
) -> str:
    """Generate text for a prompt; `kwargs` are those of `stream_generate`."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)

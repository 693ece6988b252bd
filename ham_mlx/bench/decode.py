"""Decode tokens/s and KV bytes against context length, and the bandwidth roofline.

For each context length every contender is prefilled up to it (continuing from the previous
length), then timed decode steps run in rounds that interleave the contenders (rotating their
order), so that a slow moment of a shared machine hits all of them alike. One step is the same
synchronous greedy loop for every model: forward one token, argmax, evaluate.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.bench.contenders import Contender
from ham_mlx.bench.timing import interleaved_step_samples


def roofline(c: Contender, seconds_per_step: float, read_gbps: float | None) -> dict[str, Any]:
    """Bytes one step must read (weights + KV entries + recurrent state) against bandwidth."""
    nbytes = c.info["step_weight_bytes"] + c.kv_bytes() + c.state_bytes()
    out: dict[str, Any] = {"step_bytes": nbytes}
    if read_gbps:
        bound = nbytes / (read_gbps * 1e9)  # seconds per step at full bandwidth
        out["roofline_tok_s"] = 1.0 / bound
        out["roofline_fraction"] = bound / seconds_per_step
    return out


def run_decode(
    contenders: list[Contender],
    contexts: list[int],
    steps: int,
    repeats: int,
    warmup: int,
    chunk: int,
    vocab_size: int,
    read_gbps: float | None,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    stream = mx.array(rng.integers(0, vocab_size, size=(1, max(contexts))), dtype=mx.int32)
    rows = []
    for ctx in sorted(contexts):
        prefill_tps = {}
        for c in contenders:
            n = ctx - c.offset
            if n > 0:
                secs = c.prefill(stream[:, c.offset : ctx], chunk)
                prefill_tps[c.name] = n / secs
                log(f"  prefill {c.name:<16} to {ctx:>6}: {n / secs:8.1f} tok/s")
        with contextlib.ExitStack() as stack:
            for c in contenders:
                stack.enter_context(c.fixed_thresholds())
            samples = interleaved_step_samples(contenders, warmup, repeats, steps)
        for c in contenders:
            sec = statistics.median(samples[c.name])
            frac = c.kv_fraction()
            row = {
                "context": ctx, "tokens_in_cache": c.offset, "model": c.name, "kind": c.kind,
                "target_fraction": c.target_fraction,
                "kv_fraction": None if frac is None else statistics.mean(frac),
                "kv_fraction_per_layer": frac,
                "tok_s": 1.0 / sec, "ms_per_step": 1e3 * sec,
                "samples_ms": [1e3 * s for s in samples[c.name]],
                "kv_bytes": c.kv_bytes(), "state_bytes": c.state_bytes(),
                "prefill_tok_s": prefill_tps.get(c.name),
                **c.info, **roofline(c, sec, read_gbps),
            }  # fmt: skip
            rows.append(row)
            fr = "" if frac is None else f" cached {statistics.mean(frac):.3f}"
            log(
                f"  decode  {c.name:<16} at {ctx:>6}: {row['tok_s']:7.2f} tok/s "
                f"KV {row['kv_bytes'] / 2**20:8.1f} MiB{fr}"
            )
    return rows

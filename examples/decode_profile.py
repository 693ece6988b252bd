"""Same-process A/B of the one-token decode fast path (ham_mlx.layers.common.FAST_DECODE).

Builds the `ham-mlx bench` decode contenders (random weights), prefills them to --context, freezes
the HAM thresholds, then times greedy decode steps in interleaved rounds with the fast path on and
off, so that a busy moment of a shared machine hits both alike. Prints medians and ratios to
mlx-lm's Llama (if installed), and the bandwidth-bound ratio from each model's step bytes.

    python examples/decode_profile.py --preset base --context 512 --rounds 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import ham_mlx  # noqa: F401  (first: loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from ham_mlx.bench.contenders import build_contenders, have_mlx_lm
from ham_mlx.bench.decode import roofline
from ham_mlx.layers import common

MODES = {"general": (False, True), "fast": (True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()

    cs = build_contenders(a.preset, a.vocab, [a.fraction], have_mlx_lm())
    cs = [c for c in cs if c.kind != "attn"]
    rng = np.random.default_rng(0)
    stream = mx.array(rng.integers(0, a.vocab, size=(1, a.context)), dtype=mx.int32)
    for c in cs:
        c.prefill(stream, 512)
    runs = [(c, m) for c in cs for m in MODES if c.kind in ("ham", "gdn") or m == "fast"]
    samples: dict[tuple[str, str], list[float]] = {(c.name, m): [] for c, m in runs}
    print(f"load average at start: {os.getloadavg()}")
    with contextlib.ExitStack() as stack:
        for c in cs:
            stack.enter_context(c.fixed_thresholds())
        for c, m in runs:  # warm-up (and the compiled step's first trace)
            common.FAST_DECODE, common.COMPILE = MODES[m]
            for _ in range(3):
                c.step()
        for r in range(a.rounds):
            k = r % len(runs)
            for c, m in runs[k:] + runs[:k]:
                common.FAST_DECODE, common.COMPILE = MODES[m]
                for _ in range(a.steps):
                    t = time.perf_counter()
                    c.step()
                    samples[(c.name, m)].append(time.perf_counter() - t)
    print(f"load average at end: {os.getloadavg()}")
    med = {k: statistics.median(v) for k, v in samples.items()}
    step_bytes = {c.name: roofline(c, 1.0, None)["step_bytes"] for c in cs}
    llama = med.get(("llama (mlx-lm)", "fast"))
    for (name, m), sec in med.items():
        line = f"{name:<16} {m:<8} {1e3 * sec:7.2f} ms/step  step bytes {step_bytes[name]:,}"
        if llama:
            line += f"  x llama {llama / sec:.3f} (bound {step_bytes['llama (mlx-lm)'] / step_bytes[name]:.3f})"  # noqa: E501
        print(line)
    for c in cs:
        if c.kind in ("ham", "gdn"):
            gain = med[(c.name, "general")] / med[(c.name, "fast")]
            print(f"{c.name}: fast / general speed {gain:.3f}")


if __name__ == "__main__":
    main()

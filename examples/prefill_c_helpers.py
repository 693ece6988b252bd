"""Same-process A/B of the cached prefill's C helpers on the CPU: the chunked scan
(`ham_mlx/_scan_cpu.c`) and the short convolution (`ham_mlx/_conv_cpu.c`), each against its MLX
form, in all-GDN and HAM models.

Variants: `C` (both helpers), `MLX scan` (HAM_MLX_NO_C_SCAN=1), `MLX conv` (HAM_MLX_NO_C_CONV=1),
`MLX` (neither). Models: the `ham-mlx bench` prefill contenders (random weights; HAM's τ fixed to
admit --fraction of the prompt). Each round runs every (model, variant) pair in rotating order;
prints medians of wall-clock time, tokens/s and ratios to the `MLX` variant, with the load
average before and after.

    python examples/prefill_c_helpers.py --preset base --length 4096 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import ham_mlx  # noqa: F401  (first: loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from ham_mlx.bench.model_prefill import build_prefillers
from ham_mlx.ops import cpu_conv, cpu_scan

VARIANTS = {  # the environment of each variant
    "C": {},
    "MLX scan": {"HAM_MLX_NO_C_SCAN": "1"},
    "MLX conv": {"HAM_MLX_NO_C_CONV": "1"},
    "MLX": {"HAM_MLX_NO_C_SCAN": "1", "HAM_MLX_NO_C_CONV": "1"},
}


def run(prefiller, tokens, chunk: int, variant: str) -> float:
    env = VARIANTS[variant]
    os.environ.update(env)
    try:
        return prefiller.run(tokens, chunk)[0]
    finally:
        for key in env:
            os.environ.pop(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not (cpu_scan.available() and cpu_conv.available()):
        raise SystemExit("the C helpers are not built or not loaded here")
    print("start:", os.popen("uptime").read().strip())
    tokens = mx.array(np.random.default_rng(1).integers(0, a.vocab, (1, a.length)), mx.int32)
    gdn, ham = build_prefillers(a.preset, a.vocab, [a.fraction], False, 0)
    pairs = [(name, m, v) for name, m in (("gdn", gdn), ("ham", ham)) for v in VARIANTS]
    for _, m, v in pairs:  # warm-up on two chunks
        run(m, tokens[:, : 2 * a.chunk], a.chunk, v)
    ham.cache_for(tokens)  # calibrate τ on the prompt now, outside the timed runs
    secs: dict[tuple[str, str], list[float]] = {(n, v): [] for n, _, v in pairs}
    for r in range(a.rounds):
        shift = r % len(pairs)
        for name, m, v in pairs[shift:] + pairs[:shift]:
            secs[name, v].append(run(m, tokens, a.chunk, v))
    for name in ("gdn", "ham"):
        base = statistics.median(secs[name, "MLX"])
        for v in VARIANTS:
            med = statistics.median(secs[name, v])
            runs = [round(s, 2) for s in secs[name, v]]
            print(f"{name} {v:<9} {a.length / med:7.1f} tok/s  {med:6.2f} s  "
                  f"{base / med:.2f}x MLX  runs {runs}")  # fmt: skip
    print("end:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()

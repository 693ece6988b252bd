"""Same-process A/B of the cached prefill's chunked scan: the C form (`ham_mlx/_scan_cpu.c`)
against the MLX form, in all-GDN and HAM models.

Models: the `ham-mlx bench` prefill contenders (random weights; HAM's τ fixed to admit
--fraction of the prompt). Each round runs the four (model, scan) pairs in rotating order; prints
medians of wall-clock time, tokens/s and the C / MLX ratio, with the load average before and
after.

    python examples/prefill_scan_profile.py --preset base --length 4096 --rounds 3
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
from ham_mlx.ops import cpu_scan


def run(prefiller, tokens, chunk: int, c_scan: bool) -> float:
    os.environ["HAM_MLX_NO_C_SCAN"] = "0" if c_scan else "1"
    try:
        return prefiller.run(tokens, chunk)[0]
    finally:
        os.environ.pop("HAM_MLX_NO_C_SCAN")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not cpu_scan.available():
        raise SystemExit("the C scan helper is not built or not loaded here")
    print("start:", os.popen("uptime").read().strip())
    tokens = mx.array(np.random.default_rng(1).integers(0, a.vocab, (1, a.length)), mx.int32)
    gdn, ham = build_prefillers(a.preset, a.vocab, [a.fraction], False, 0)
    pairs = [(name, m, c) for name, m in (("gdn", gdn), ("ham", ham)) for c in (True, False)]
    for _, m, c in pairs:  # warm-up on two chunks
        run(m, tokens[:, : 2 * a.chunk], a.chunk, c)
    ham.cache_for(tokens)  # calibrate τ on the prompt now, outside the timed runs
    secs: dict[tuple[str, bool], list[float]] = {(n, c): [] for n, _, c in pairs}
    for r in range(a.rounds):
        for name, m, c in pairs[r % 4 :] + pairs[: r % 4]:
            secs[name, c].append(run(m, tokens, a.chunk, c))
    for name in ("gdn", "ham"):
        c_s, mlx_s = (statistics.median(secs[name, c]) for c in (True, False))
        print(f"{name}: C scan {a.length / c_s:.1f} tok/s ({c_s:.2f} s), MLX scan "
              f"{a.length / mlx_s:.1f} tok/s ({mlx_s:.2f} s): {mlx_s / c_s:.2f}x")  # fmt: skip
    print("end:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()

"""Same-process A/B of HAM's cached-prefill attention, with all-GDN as the yardstick.

`general`: each chunk's queries attend every slot up to the cache's host-side bound (the entries
stored before the call plus all of the chunk's tokens, most of them masked) through
`compact_attention`. `fast`: they attend the filled slots only (one host read of the counts per
layer and call), through `chunk_attention`. Models: the `ham-mlx bench` prefill contenders (random
weights, each layer's τ fixed to admit --fraction of the prompt). Runs interleave all-GDN,
general and fast in rotating order; prints medians of wall-clock and of process CPU time
(steadier on a machine shared with other jobs), ratios to all-GDN and the load average before
and after.

    python examples/prefill_profile.py --preset base --length 4096 --rounds 3
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

from ham_mlx.bench.model_prefill import build_prefillers
from ham_mlx.cache import HAMCache
from ham_mlx.ops import attention


@contextlib.contextmanager
def general_path():
    """The path before the fast one: the bound view of the cache and `compact_attention`."""
    fetch, fits = HAMCache.fetch, attention.fits_exp2
    HAMCache.fetch = lambda self, exact=False: fetch(self, False)
    attention.fits_exp2 = lambda *a: False
    try:
        yield
    finally:
        HAMCache.fetch, attention.fits_exp2 = fetch, fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print("start:", os.popen("uptime").read().strip())
    rng = np.random.default_rng(1)
    tokens = mx.array(rng.integers(0, a.vocab, (1, a.length)), dtype=mx.int32)
    gdn, ham = build_prefillers(a.preset, a.vocab, [a.fraction], False, 0)
    runs = {
        "gdn": lambda t=tokens: gdn.run(t, a.chunk),
        "ham general": lambda t=tokens: _general(ham, t, a.chunk),
        "ham fast": lambda t=tokens: ham.run(t, a.chunk),
    }
    for fn in runs.values():  # warm-up on two chunks
        fn(tokens[:, : 2 * a.chunk])
    ham.cache_for(tokens)  # calibrate τ on the prompt now, outside the timed runs
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    fraction = {}
    names = list(runs)
    for r in range(a.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            t = time.process_time()
            sec, fraction[name] = runs[name]()
            cpu[name].append(time.process_time() - t)
            wall[name].append(sec)
    for label, samples in (("wall", wall), ("cpu", cpu)):
        gdn_s = statistics.median(samples["gdn"])
        for name, s in samples.items():
            med = statistics.median(s)
            frac = "" if fraction[name] is None else f" cached {fraction[name]:.3f}"
            print(f"{label:<4} {name:<12} {a.length / med:8.1f} tok/s  {gdn_s / med:.2f}x gdn"
                  f"{frac}  runs {[round(x, 2) for x in s]} s")  # fmt: skip
        fast, general = (statistics.median(samples[k]) for k in ("ham fast", "ham general"))
        print(f"{label:<4} fast / general: {general / fast:.2f}x")
    print("end:", os.popen("uptime").read().strip())


def _general(ham, tokens, chunk):
    with general_path():
        return ham.run(tokens, chunk)


if __name__ == "__main__":
    main()

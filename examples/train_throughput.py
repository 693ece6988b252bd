"""Training throughput on this machine: the fast CPU path against the reference path, one process.

    python examples/train_throughput.py                      # small preset, 16 x 256 tokens
    python examples/train_throughput.py --preset tiny --batch 8 --seq-len 128 --rounds 3

Every variant (see ham_mlx/bench/train_step.py) trains the same model from the same weights on the
same batch; after two untimed steps each (the first compiles), the variants take turns, the
order rotating every round, so that a slow moment of a shared machine hits all of them alike.
Prints the machine, the median seconds per step, tokens/s and the speed-up over the reference
path, and writes the samples as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ham_mlx  # noqa: F401  (first: OpenBLAS on Linux)

# isort: split
from ham_mlx.bench.machine import describe, machine_info
from ham_mlx.bench.timing import interleaved_step_samples
from ham_mlx.bench.train_step import VARIANTS, TrainStep, summarize
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (small)")
    p.add_argument("--layer-type", default="ham", choices=["ham", "gdn", "attn"],
                   help="mixer of every layer (ham)")  # fmt: skip
    p.add_argument("--batch", type=int, default=16, help="sequences per step (16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant and round (1)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (all)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the samples and the machine here")
    a = p.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    info = machine_info()
    print(describe(info))
    vocab = Tokenizer.from_file(bundled_tokenizer_path()).vocab_size
    runners = [TrainStep(n, a.preset, vocab, a.batch, a.seq_len, **_layers(a)) for n in names]
    samples = interleaved_step_samples(runners, warmup=2, repeats=a.rounds, steps=a.steps)
    rows = summarize(samples, a.batch * a.seq_len)
    print(f"{a.preset} preset, {a.layer_type} layers, {a.batch} x {a.seq_len} tokens a step, "
          f"{a.rounds} rounds")  # fmt: skip
    print(f"{'variant':18s} {'s/step':>8s} {'tokens/s':>9s} {'vs reference':>13s}")
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['variant']:18s} {r['median_s']:8.3f} {r['tokens_per_s']:9.0f} {speedup:>13s}")
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "args": vars(a) | {"json": str(a.json)},
                                      "results": rows}, indent=1))  # fmt: skip


def _layers(a: argparse.Namespace) -> dict:
    """Overrides for --layer-type: layer_types sized to the preset's depth; attention layers get
    the hybrid presets' heads (none for ham, the presets' own)."""
    if a.layer_type == "ham":
        return {}
    from ham_mlx.presets import HYBRID_ATTN, PRESETS

    n = PRESETS[a.preset]["num_hidden_layers"]
    out = {"layer_types": [a.layer_type] * n}
    if a.layer_type == "attn":
        out["attn"] = dict(HYBRID_ATTN, num_heads=4, num_kv_heads=4)
    return out


if __name__ == "__main__":
    main()

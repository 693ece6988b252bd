"""Reproduce HAM's memory/quality trade-off on multi-query associative recall (MQAR).

Trains same-size models — all-attention, all-GDN, and HAM at several KV targets (1.0: every token
cached, HAM's attention sees the whole context) — on the same MQAR task (Zoology's layout), then
measures recall accuracy on held-out sequences against the fraction of tokens each model actually
kept in its KV cache, and recall by query index. Writes results.json, results.md and tradeoff.png.

The all-attention model trains with its own learning rate and more steps (--attn-lr, --attn-steps):
at HAM's lr it stays on the plateau before its induction heads form (docs/mqar_tradeoff.md).

    python examples/mqar_tradeoff.py                  # about an hour on a 2-core CPU
    python examples/mqar_tradeoff.py --only attention # retrain some models, keep the other rows
    python examples/mqar_tradeoff.py --quick          # a 2-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import ham_mlx  # noqa: F401  (first: OpenBLAS on Linux)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.mqar import MQAR

ATTN = {"num_heads": 2, "num_kv_heads": 2}


def model_specs(targets: list[float], state_head_dim: int) -> dict[str, dict]:
    """Width 64, 2 layers. `head_dim` sizes the GDN/HAM heads (the recurrent state of a layer is
    2 heads of head_dim x 2 head_dim); attention has 2 heads of 32 whatever it is."""
    base = dict(
        hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=state_head_dim, attn=ATTN
    )
    specs = {
        "attention": {**base, "layer_types": ["attn", "attn"]},
        "gdn": {**base, "layer_types": ["gdn", "gdn"]},
    }
    for t in targets:
        specs[f"ham@{t:g}"] = {**base, "layer_types": ["ham", "ham"], "ham_kv_target": t}
    return specs


def accuracy_by_query(model, args: argparse.Namespace, batches: int = 8) -> list[float]:
    """Held-out recall at each query index (0 = the first query of the query region)."""
    task = MQAR(args.vocab, args.pairs, args.seq_len)
    hits = np.zeros(args.pairs)
    for i in range(batches):
        x, y, mask = task.batch(10**9 + i, args.batch_size)
        pred = np.array(mx.argmax(model(mx.array(x)), axis=-1))
        rows, cols = np.nonzero(mask)  # row-major: each row's answers in order
        right = (pred[rows, cols] == y[rows, cols]).reshape(len(x), args.pairs)
        hits += right.mean(axis=0)
    return (hits / batches).tolist()


def recipe(spec: dict, args: argparse.Namespace) -> tuple[int, float, float, list[int]]:
    """(steps, peak lr, final lr, seeds) of a model. Attention keeps its lr after the warmup (at
    3e-4 its induction heads formed after 5300-6500 steps in this trainer, and rarely while the lr
    decayed) and trains from several seeds, of which the best counts."""
    if spec["layer_types"][0] == "attn":
        seeds = [args.seed + i for i in range(args.attn_seeds)]
        return args.attn_steps, args.attn_lr, args.attn_lr, seeds
    return args.steps, args.lr, args.lr / 10, [args.seed]


def run(name: str, spec: dict, args: argparse.Namespace, out: Path) -> dict:
    steps, lr, min_lr, seeds = recipe(spec, args)
    runs = [train(name, spec, args, out, steps, lr, min_lr, seed) for seed in seeds]
    best = max(runs, key=lambda r: r["accuracy"])
    best["accuracy_by_seed"] = {r["seed"]: r["accuracy"] for r in runs}
    best["train_seconds"] = sum(r["train_seconds"] for r in runs)
    return best


def train(name: str, spec: dict, args: argparse.Namespace, out: Path, steps: int, lr: float,
          min_lr: float, seed: int) -> dict:  # fmt: skip
    cfg = TrainConfig.from_dict(
        dict(
            out_dir=str(out / f"{name}-seed{seed}"), model=spec, steps=steps,
            batch_size=args.batch_size, lr=lr, min_lr=min_lr, warmup=steps // 10, eval_every=steps,
            eval_batches=args.eval_batches, checkpoint_every=steps, progress=not args.quiet,
            data={"kind": "mqar", "seq_len": args.seq_len, "mqar_vocab": args.vocab,
                  "mqar_pairs": args.pairs},
            seed=seed,
        )
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()["eval"]
    types = spec["layer_types"]
    if types[0] == "attn":
        fraction = 1.0
    elif types[0] == "gdn":
        fraction = 0.0
    else:
        fraction = sum(result["eval_kv_fraction"]) / len(result["eval_kv_fraction"])
    return {
        "model": name, "target": spec.get("ham_kv_target"), "kv_fraction": fraction,
        "per_layer_kv_fraction": result["eval_kv_fraction"], "accuracy": result["eval_accuracy"],
        "eval_loss": result["eval_loss"], "thresholds": trainer.model.thresholds(),
        "accuracy_by_query": accuracy_by_query(trainer.model, args), "steps": steps, "lr": lr,
        "min_lr": min_lr, "seed": seed,
        "parameters": sum(v.size for _, v in tree_flatten(trainer.model.parameters())),
        "train_seconds": time.perf_counter() - t0,
    }  # fmt: skip


def write_report(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    setup = (
        f"MQAR: {args.pairs} pairs, seq_len {args.seq_len}, vocab {args.vocab}; models: 2 layers, "
        f"width 64; GDN/HAM heads 2 x {args.state_head_dim}, attention heads 2 x 32; "
        f"batch {args.batch_size}, warmup 10%; HAM and GDN {args.steps} steps at lr {args.lr} "
        f"(cosine to lr/10); attention {args.attn_steps} steps at a constant lr {args.attn_lr}, "
        f"best of {args.attn_seeds} seeds; accuracy "
        f"over {args.eval_batches} held-out batches. {platform.machine()}, MLX {mx.__version__}."
    )
    mid = args.pairs // 2
    head = f"recall at query 1 / {mid + 1} / {args.pairs}"
    lines = [setup, "", "| model | parameters | KV target | KV fraction measured | recall accuracy "
             f"| {head} |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        target = "—" if r["target"] is None else f"{r['target']:g}"
        q = r["accuracy_by_query"]
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {target} | {r['kv_fraction']:.3f} | "
            f"{r['accuracy']:.3f} | {q[0]:.2f} / {q[mid]:.2f} / {q[-1]:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ham = sorted((r for r in rows if r["target"] is not None), key=lambda r: r["kv_fraction"])
    ax.plot([r["kv_fraction"] for r in ham], [r["accuracy"] for r in ham], "o-", label="HAM")
    for r in ham:
        ax.annotate(f"target {r['target']:g}", (r["kv_fraction"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))  # fmt: skip
    for r in rows:
        if r["target"] is None:
            marker = "s" if r["model"] == "attention" else "^"
            ax.plot([r["kv_fraction"]], [r["accuracy"]], marker, markersize=8, label=r["model"])
    ax.set_xlabel("fraction of tokens in the KV cache (measured)")
    ax.set_ylabel("MQAR recall accuracy")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("HAM memory / recall trade-off on MQAR", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/mqar_tradeoff", help="output folder")
    p.add_argument("--targets", default="0.05,0.1,0.25,0.5,1", help="HAM KV targets")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=40)
    p.add_argument(
        "--state-head-dim", type=int, default=4,
        help="GDN/HAM head size: small, so that the pairs overflow the recurrent state",
    )  # fmt: skip
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000, help="training steps of HAM and GDN")
    p.add_argument("--attn-steps", type=int, default=10000, help="training steps of attention")
    p.add_argument("--attn-seeds", type=int, default=2, help="attention runs (the best counts)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of HAM and GDN")
    p.add_argument("--attn-lr", type=float, default=3e-4, help="peak learning rate of attention")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only", help="comma-separated models to (re)train, e.g. attention,gdn; the other rows "
        "are kept from OUT/results.json",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.seq_len, args.steps, args.attn_steps, args.eval_batches = 6, 32, 60, 60, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    specs = model_specs(targets, args.state_head_dim)
    only, kept = None, {}
    if args.only:
        only = args.only.split(",")
        if unknown := [n for n in only if n not in specs]:
            p.error(f"--only: no model named {', '.join(unknown)} (models: {', '.join(specs)})")
        if (out / "results.json").exists():
            kept = {r["model"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    rows = []
    for name, spec in specs.items():
        if only is not None and name not in only:
            if name in kept:
                rows.append(kept[name])
            continue
        rows.append(run(name, spec, args, out))
        r = rows[-1]
        print(f"{name}: accuracy {r['accuracy']:.3f} at KV fraction {r['kv_fraction']:.3f} "
              f"({r['train_seconds']:.0f} s)", flush=True)  # fmt: skip
        write_report(rows, args, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()

"""Reproduce HAM's memory/quality trade-off on multi-query associative recall (MQAR).

Trains same-size models — all-attention, all-GDN, and HAM at several KV targets (1.0: every token
cached, HAM's attention sees the whole context) — on the same MQAR task, then measures recall
accuracy on held-out sequences against the fraction of tokens each model actually kept in its KV
cache, and recall by query index (which shows a model that only eliminates the values already
answered: accuracy 1/(pairs - i) at query i). Writes results.json, results.md and tradeoff.png.

    python examples/mqar_tradeoff.py                  # about 30 minutes on a 2-core CPU
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

from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.mqar import MQAR

ATTN = {"num_heads": 2, "num_kv_heads": 2}


def model_specs(targets: list[float]) -> dict[str, dict]:
    base = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, attn=ATTN)
    specs = {
        "attention": {**base, "layer_types": ["attn", "attn"]},
        "gdn": {**base, "layer_types": ["gdn", "gdn"]},
    }
    for t in targets:
        specs[f"ham@{t:g}"] = {**base, "layer_types": ["ham", "ham"], "ham_kv_target": t}
    return specs


def accuracy_by_query(model, args: argparse.Namespace, batches: int = 8) -> list[float]:
    """Held-out recall at each query index (0 = the first query after the separator)."""
    task = MQAR(args.vocab, args.pairs, args.seq_len)
    hits = np.zeros(args.pairs)
    for i in range(batches):
        x, y, mask = task.batch(10**9 + i, args.batch_size)
        pred = np.array(mx.argmax(model(mx.array(x)), axis=-1))
        answers = np.nonzero(mask[0])[0]  # the same answer positions in every row
        hits += (pred[:, answers] == y[:, answers]).mean(axis=0)
    return (hits / batches).tolist()


def run(name: str, spec: dict, args: argparse.Namespace, out: Path) -> dict:
    cfg = TrainConfig.from_dict(
        dict(
            out_dir=str(out / name), model=spec, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, min_lr=args.lr / 10, warmup=args.steps // 10, eval_every=args.steps,
            eval_batches=args.eval_batches, checkpoint_every=args.steps, progress=not args.quiet,
            data={"kind": "mqar", "seq_len": args.seq_len, "mqar_vocab": args.vocab,
                  "mqar_pairs": args.pairs},
            seed=args.seed,
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
        "accuracy_by_query": accuracy_by_query(trainer.model, args),
        "train_seconds": time.perf_counter() - t0,
    }  # fmt: skip


def write_report(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    setup = (
        f"MQAR: {args.pairs} pairs, seq_len {args.seq_len}, vocab {args.vocab}; models: 2 layers, "
        f"width 64, 2 heads of 16; {args.steps} steps of batch {args.batch_size}, lr {args.lr}; "
        f"accuracy over {args.eval_batches} held-out batches. {platform.machine()}, "
        f"MLX {mx.__version__}."
    )
    mid = args.pairs // 2
    head = f"recall at query 1 / {mid + 1} / {args.pairs}"
    lines = [setup, "", f"| model | KV target | KV fraction measured | recall accuracy | {head} |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        target = "—" if r["target"] is None else f"{r['target']:g}"
        q = r["accuracy_by_query"]
        lines.append(
            f"| {r['model']} | {target} | {r['kv_fraction']:.3f} | {r['accuracy']:.3f} | "
            f"{q[0]:.2f} / {q[mid]:.2f} / {q[-1]:.2f} |"
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
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=72)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.seq_len, args.steps, args.eval_batches = 6, 32, 60, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for name, spec in model_specs(targets).items():
        rows.append(run(name, spec, args, out))
        r = rows[-1]
        print(f"{name}: accuracy {r['accuracy']:.3f} at KV fraction {r['kv_fraction']:.3f} "
              f"({r['train_seconds']:.0f} s)", flush=True)  # fmt: skip
        write_report(rows, args, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()

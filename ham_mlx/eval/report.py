"""Write an evaluation's results: JSON (everything), markdown (the tables), a PNG (matplotlib,
skipped with a note when it is not installed)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any


def write_report(result: dict[str, Any], out: str | Path) -> list[Path]:
    """out/eval-TASK.json, .md and .png (when matplotlib imports); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval-{result['task']}"
    result = {**result, "machine": machine()}
    files = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    files[0].write_text(json.dumps(result, indent=2) + "\n")
    files[1].write_text(markdown(result))
    png = plot(result, stem.with_suffix(".png"))
    return files + ([png] if png else [])


def machine() -> dict[str, Any]:
    import mlx.core as mx

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(), "mlx": mx.__version__, "device": str(mx.default_device()),
    }  # fmt: skip


def _fractions(kv: list[float]) -> str:
    return " / ".join(f"{f:.3f}" for f in kv) if kv else "— (no HAM layers)"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# ham-mlx eval {r['task']}", "", f"Model: `{r['model']}`", ""]
    if r["task"] == "ppl":
        lines += [
            f"Input: `{r['input']}`, {r['tokens']} tokens scored, fed in chunks of {r['chunk']}.",
            "", "| nats/token | bits/token | perplexity | KV fraction per HAM layer |",
            "|---|---|---|---|",
            f"| {r['nats_per_token']:.4f} | {r['bits_per_token']:.4f} | {r['perplexity']:.2f} | "
            f"{_fractions(r['kv_fraction'])} |",
        ]  # fmt: skip
    elif r["task"] == "mqar":
        lines += [
            f"{r['sequences']} sequences: vocab {r['vocab']}, {r['pairs']} pairs, "
            f"{r['queries']} queries, seq_len {r['seq_len']}.",
            "", "| recall accuracy | KV fraction per HAM layer |", "|---|---|",
            f"| {r['accuracy']:.4f} | {_fractions(r['kv_fraction'])} |",
        ]  # fmt: skip
    else:
        lines += [
            f"Needle task `{r['niah']}`; answers scored by exact match of the digits.", "",
            "| context length | depth | accuracy | samples |", "|---|---|---|---|",
        ]  # fmt: skip
        lines += [f"| {a['length']} | {a['depth']} | {a['accuracy']:.3f} | {a['n']} |"
                  for a in r["accuracy"]]  # fmt: skip
        kv = [s["kv_fraction"] for s in r["samples"]]
        if kv and kv[0]:
            mean = [sum(col) / len(col) for col in zip(*kv)]
            lines += ["", f"Mean KV fraction per HAM layer: {_fractions(mean)}"]
    m = r["machine"]
    lines += ["", f"{m['date']}; {m['platform']}; Python {m['python']}; MLX {m['mlx']}", ""]
    return "\n".join(lines)


def pyplot(missing: str):
    """matplotlib.pyplot on the Agg backend, or None (after a note naming `missing`, what is not
    drawn) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no {missing}", file=sys.stderr)
        return None
    return plt


def plot(r: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot("plot written")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if r["task"] == "niah":
        cells = [a for a in r["accuracy"] if a["depth"] != "all"]
        lengths = sorted({a["length"] for a in cells})
        depths = sorted({a["depth"] for a in cells})
        grid = [[next(a["accuracy"] for a in cells if a["length"] == n and a["depth"] == d)
                 for n in lengths] for d in depths]  # fmt: skip
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title(f"needle in a haystack ({r['niah']})")
    else:
        kv = r["kv_fraction"]
        ax.bar(range(len(kv)), kv, color="tab:blue")
        ax.set_xticks(range(len(kv)), [f"HAM {i}" for i in range(len(kv))])
        ax.set_ylabel("KV fraction")
        ax.set_ylim(0, 1)
        score = (f"perplexity {r['perplexity']:.2f}" if r["task"] == "ppl"
                 else f"recall {r['accuracy']:.3f}")  # fmt: skip
        ax.set_title(f"{r['task']}: {score}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

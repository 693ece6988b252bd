"""Write a run's results: results.json, report.md (tables) and PNG plots (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ham_mlx.bench.machine import describe

MATPLOTLIB_MISSING = (
    "matplotlib is not installed, so no PNG plots were written. "
    "Install the benchmark extras: pip install 'ham-mlx[bench]' (or: pip install matplotlib mlx-lm)"
)


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "–" if not a or not b else f"{a / b:.{digits}f}x"


def _no_kv(row: dict[str, Any]) -> bool:
    """A model without a KV cache: all-GDN, or mlx-lm's Gated DeltaNet model."""
    return row["kind"] == "gdn" or (row["kind"] == "mlx-lm" and row["kv_bytes"] == 0)


def headline_table(results: dict[str, Any]) -> str:
    """Models as rows: decode tok/s at each context, then cached fraction and KV at the longest."""
    decode = results.get("decode") or []
    if not decode:
        return ""
    contexts = sorted({r["context"] for r in decode})
    last = contexts[-1]
    models = list(dict.fromkeys(r["model"] for r in decode))
    at = {(r["model"], r["context"]): r for r in decode}
    head = ["model", "params"] + [f"tok/s @{_ctx(c)}" for c in contexts]
    head += [f"cached @{_ctx(last)}", f"KV MiB @{_ctx(last)}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        r = at[(m, last)]
        cells = [m, f"{r['parameters'] / 1e6:.3g}M"]
        cells += [f"{at[(m, c)]['tok_s']:.1f}" for c in contexts]
        frac = r["kv_fraction"]
        cached = "0" if _no_kv(r) else ("all" if frac is None else f"{frac:.1%}")
        cells += [cached, _mib(r["kv_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table(decode: list[dict[str, Any]]) -> str:
    head = ["context", "model", "cached", "tok/s", "ms/step", "vs attn", "vs llama", "KV MiB",
            "KV vs attn", "KV vs llama", "step reads MiB", "roofline"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in sorted({r["context"] for r in decode}):
        rows = [r for r in decode if r["context"] == ctx]
        ref = {r["model"]: r for r in rows}
        attn, llama = ref.get("attn", {}), ref.get("llama (mlx-lm)", {})
        for r in rows:
            frac = r["kv_fraction"]
            cached = "0" if _no_kv(r) else ("all" if frac is None else f"{frac:.3f}")
            roof = r.get("roofline_fraction")
            cells = [
                _ctx(ctx), r["model"], cached, f"{r['tok_s']:.2f}", f"{r['ms_per_step']:.1f}",
                _ratio(r["tok_s"], attn.get("tok_s")), _ratio(r["tok_s"], llama.get("tok_s")),
                _mib(r["kv_bytes"]), _ratio(r["kv_bytes"], attn.get("kv_bytes"), 3),
                _ratio(r["kv_bytes"], llama.get("kv_bytes"), 3), _mib(r["step_bytes"]),
                "–" if roof is None else f"{roof:.0%}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scan_table(rows: list[dict[str, Any]]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    at = {(r["method"], r["T"]): r for r in rows}
    head = ["T"] + [f"{m} tok/s" for m in methods] + ["chunked / sequential", "chunked / mx.fast"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in sorted({r["T"] for r in rows}):
        cells = [str(T)] + [f"{at[(m, T)]['tok_s']:.0f}" for m in methods]
        c = at[("chunked scan", T)]["tok_s"]
        cells += [_ratio(c, at[("sequential scan", T)]["tok_s"], 1)]
        cells += [_ratio(c, at[("mx.fast.gated_delta_update", T)]["tok_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_table(rows: list[dict[str, Any]]) -> str:
    at = {(r["method"], r["T"], r["fraction"]): r for r in rows}
    head = ["T", "cached", "masked-dense tok/s", "admitted-only tok/s", "admitted-only / dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T, f in sorted({(r["T"], r["fraction"]) for r in rows}):
        d, c = at[("masked-dense", T, f)]["tok_s"], at[("admitted-only", T, f)]["tok_s"]
        lines.append(f"| {T} | {f:.0%} | {d:.0f} | {c:.0f} | {_ratio(c, d, 1)} |")
    return "\n".join(lines)


def model_prefill_table(rows: list[dict[str, Any]]) -> str:
    """Prompt lengths as rows: each model's tok/s, its ratio to all-GDN, its roofline."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    at = {(r["model"], r["T"]): r for r in rows}
    head = ["T"] + [f"{m} tok/s (vs gdn, roofline)" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in sorted({r["T"] for r in rows}):
        gdn = at.get(("gdn", T), {}).get("tok_s")
        cells = [_ctx(T)]
        for m in models:
            r = at.get((m, T))
            if r is None:
                cells.append("–")
                continue
            roof = r["roofline_fraction"]
            cached = "" if r["kv_fraction"] is None else f", cached {r['kv_fraction']:.3f}"
            cells.append(f"{r['tok_s']:.1f} ({_ratio(r['tok_s'], gdn)}, "
                         f"{'–' if roof is None else f'{roof:.0%}'}{cached})")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def onnx_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    at = {(r["context"], r["runtime"]): r for r in rows}
    lines = [
        f"All-HAM `{result['preset']}` model, τ per layer set for {result['fraction']:.0%} cached "
        f"and baked into the fp32 export; prefill in chunks of {result['chunk']}; greedy decode "
        "medians, rounds alternating the runtimes.",
        "",
        "| context | MLX decode tok/s | ORT decode tok/s | ORT/MLX | MLX prefill tok/s | "
        "ORT prefill tok/s | max abs Δlogit | same admissions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ctx in sorted({r["context"] for r in rows}):
        m, o = at[(ctx, "mlx")], at[(ctx, "onnxruntime")]
        lines.append(
            f"| {_ctx(ctx)} | {m['tok_s']:.1f} | {o['tok_s']:.1f} | "
            f"{_ratio(o['tok_s'], m['tok_s'])} | {m['prefill_tok_s']:.0f} | "
            f"{o['prefill_tok_s']:.0f} | "
            f"{m['max_abs_logit_diff']:.1e} | {'yes' if m['admitted_equal'] else 'NO'} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    out = ["# ham-mlx bench", "", f"Command: `{results['command']}`", ""]
    out += [f"Machine: {describe(results['machine'])}", ""]
    if results.get("probe"):
        p = results["probe"]
        out += [
            f"Probe (same run): read bandwidth {p['read_gbps']:.1f} GB/s, the roofline's (best "
            f"run of a float32 matvec over {p['bytes'] / 2**20:.0f} MiB: numpy "
            f"{p['numpy_matvec_gbps']:.1f}, MLX {p['mlx_matvec_gbps']:.1f} GB/s); copy "
            f"{p['copy_gbps']:.1f} GB/s (read + write); MLX float32 {p['matmul_n']}² matmul "
            f"{p['mlx_matmul_gflops']:.0f} GFLOP/s.",
            "",
        ]  # fmt: skip
    if results.get("decode"):
        o = results["options"]
        out += [
            "## Decode",
            "",
            f"Preset `{o['preset']}`, vocab {o['vocab']}, float32, random weights, batch 1; "
            f"median of {o['repeats']} rounds x {o['steps']} greedy steps per model, rounds "
            "interleaved. `cached`: measured fraction of tokens in the HAM caches (mean over "
            "layers). KV: bytes of the stored entries. `roofline`: (weights + KV + state bytes a "
            "step reads) / read bandwidth, divided by the measured step time.",
            "",
            headline_table(results),
            "",
            decode_table(results["decode"]),
            "",
        ]  # fmt: skip
        for note in results.get("notes", []):
            out += [f"Note: {note}", ""]
    prefill = results.get("prefill") or {}
    if prefill.get("model"):
        o = results["options"]
        out += [
            "## Prefill: whole models",
            "",
            f"Preset `{o['preset']}`, vocab {o['vocab']}, float32, random weights, batch 1; from "
            f"an empty cache in chunks of {o['chunk']}; median of {o['prefill_repeats']} rounds, "
            "interleaved. HAM: each layer's τ fixed to admit the named fraction of the prompt "
            "(`cached`: the measured fraction). "
            "`roofline`: FLOPs of the weight products / the probe's matmul "
            "GFLOP/s, divided by the measured time.",
            "",
            model_prefill_table(prefill["model"]),
            "",
        ]  # fmt: skip
    if prefill.get("scan"):
        out += ["## Prefill: gated-delta scan (one layer)", "", scan_table(prefill["scan"]), ""]
    if prefill.get("attention"):
        out += ["## Prefill: attention over admitted tokens (one layer)", ""]
        out += [attention_table(prefill["attention"]), ""]
    if (results.get("onnx") or {}).get("status") == "measured":
        out += ["## onnxruntime vs MLX (same model, same τ)", "", onnx_table(results["onnx"]), ""]
    if results.get("targets"):
        out += ["## Speed targets", "", "| target | status | measured |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in results["targets"]]
        out.append("")
    return "\n".join(out)


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    """decode.png (tok/s and KV MiB against context) and prefill.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    decode = results.get("decode") or []
    if decode:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for m in dict.fromkeys(r["model"] for r in decode):
            rows = sorted((r for r in decode if r["model"] == m), key=lambda r: r["context"])
            x = [r["context"] for r in rows]
            style = "-o" if rows[0]["kind"] == "ham" else "--s"
            ax1.plot(x, [r["tok_s"] for r in rows], style, label=m, markersize=4)
            if rows[0]["kind"] != "gdn":
                ax2.plot(x, [r["kv_bytes"] / 2**20 for r in rows], style, label=m, markersize=4)
        o = results["options"]
        contexts = sorted({r["context"] for r in decode})
        for ax, title in ((ax1, "decode tokens/s"), (ax2, "KV cache MiB")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [_ctx(c) for c in contexts])
            ax.set_xlabel("context (tokens)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        ax2.set_yscale("log")
        ax1.legend(fontsize=8)
        fig.suptitle(f"preset {o['preset']}, {results['machine']['cpu']}, "
                     f"{results['machine']['cores']} cores, MLX {results['machine']['mlx']}",
                     fontsize=9)  # fmt: skip
        fig.tight_layout()
        fig.savefig(folder / "decode.png", dpi=90)
        plt.close(fig)
        written.append("decode.png")
    prefill = results.get("prefill") or {}
    if prefill.get("scan") or prefill.get("attention"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        titles = {"scan": "gated-delta scan", "attention": "attention over admitted tokens"}
        for (key, title), ax in zip(titles.items(), axes):
            rows = prefill.get(key) or []
            series: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                name = r["method"] + (f" ({r['fraction']:.0%})" if "fraction" in r else "")
                series.setdefault(name, []).append((r["T"], r["tok_s"]))
            for name, pts in series.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=name, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            lengths = sorted({r["T"] for r in rows})
            ax.set_xticks(lengths, [_ctx(n) for n in lengths])
            ax.set_xlabel("tokens")
            ax.set_title(f"prefill tokens/s: {title}")
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "prefill.png", dpi=90)
        plt.close(fig)
        written.append("prefill.png")
    return written


def write(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write results.json, report.md and the plots into folder; return the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "report.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    paths += [folder / name for name in plots(results, folder)]
    return paths

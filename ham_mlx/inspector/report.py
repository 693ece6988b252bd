"""A self-contained HTML report of a trace: inline CSS, the plot embedded as base64."""

from __future__ import annotations

import base64
from html import escape

import numpy as np

from ham_mlx.inspector.palette import layer_color
from ham_mlx.inspector.trace import LayerTrace, Trace

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       background: #f6f7f9; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.meta { color: #5b6372; margin: 0 0 16px; }
code { font: 13px ui-monospace, "SFMono-Regular", Menlo, monospace; }
.card { background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; padding: 14px 18px; }
.legend { display: flex; flex-wrap: wrap; gap: 10px 22px; align-items: center; }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.legend .note { color: #5b6372; font-size: 13px; flex-basis: 100%; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 6px 10px; border-bottom: 1px solid #eceef2; }
th:first-child, td:first-child { text-align: left; }
th { font-weight: 600; color: #5b6372; font-size: 13px; }
.bar { display: inline-block; width: 160px; height: 10px; background: #eceef2;
       border-radius: 5px; vertical-align: middle; margin-right: 8px; overflow: hidden; }
.bar i { display: block; height: 100%; background: var(--c); }
.layer { margin-bottom: 14px; border-left: 5px solid var(--c); }
.layer h3 { font-size: 14px; margin: 0 0 8px; font-weight: 600; }
.layer h3 span { color: #5b6372; font-weight: 400; }
.text { font: 14px/1.9 ui-monospace, "SFMono-Regular", Menlo, monospace; white-space: pre-wrap;
        word-break: break-word; }
.tok { border-radius: 3px; cursor: help; }
.tok:hover { outline: 1px solid #7a8294; }
.tok.st { background: color-mix(in srgb, var(--c) 38%, white);
          box-shadow: inset 0 -2px 0 var(--c); }
.tok.st + .tok.st { box-shadow: inset 1px 0 0 #fff, inset 0 -2px 0 var(--c); }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
          background: color-mix(in srgb, var(--c) 38%, white);
          box-shadow: inset 0 -2px 0 var(--c); }
.nl { color: #9aa1ad; }
img { max-width: 100%; height: auto; display: block; }
footer { color: #8a91a0; font-size: 12px; margin-top: 24px; }
"""


def token_span(p: int, token: str, lt: LayerTrace) -> str:
    """One token as a span whose hover title gives its score, τ and whether it was stored."""
    s, stored = float(lt.scores[p]), bool(lt.admitted[p])
    verdict = f"≥ τ {lt.threshold:.4f}: stored" if stored else f"< τ {lt.threshold:.4f}: not stored"
    if lt.kind == "gdn":  # a GDN layer stores nothing
        verdict = f"{'≥' if stored else '<'} level {lt.threshold:.4f} (gdn: nothing is stored)"
    title = f"#{p} {token!r} · layer {lt.index} · score {s:.4f} {verdict}"
    text = escape(token).replace("\n", '<span class="nl">↵</span>\n')
    cls = "tok st" if stored else "tok"
    return f'<span class="{cls}" data-pos="{p}" title="{escape(title)}">{text}</span>'


def summary_rows(t: Trace) -> list[str]:
    rows = []
    for k, lt in enumerate(t.layers):
        lo, med, hi = np.min(lt.scores), np.median(lt.scores), np.max(lt.scores)
        gdn = lt.kind == "gdn"
        name = f"layer {lt.index} (gdn)" if gdn else f"layer {lt.index}"
        tau = f"level {lt.threshold:.4f}" if gdn else f"{lt.threshold:.4f}"
        rows.append(
            f'<tr style="--c:{layer_color(k)}"><td><span class="swatch"></span> {name}'
            f"</td><td>{tau}</td><td>{lt.n_admitted}{' marked' if gdn else ''}</td>"
            f"<td>{len(lt.admitted)}</td>"
            f'<td><span class="bar"><i style="width:{100 * lt.kv_fraction:.1f}%"></i></span>'
            f"{lt.kv_fraction:.3f}</td><td>{lo:.3f} / {med:.3f} / {hi:.3f}</td></tr>"
        )
    return rows


def layer_block(t: Trace, k: int, lt: LayerTrace) -> str:
    spans = "".join(token_span(p, tok, lt) for p, tok in enumerate(t.tokens))
    about = (
        f"τ = {lt.threshold:.4f} · stored {lt.n_admitted} of {len(lt.admitted)} tokens · "
        f"KV fraction {lt.kv_fraction:.3f}"
    )
    if lt.kind == "gdn":
        about = (
            f"GDN layer, nothing stored · marked: cosine surprise of its state ≥ level "
            f"{lt.threshold:.4f}, {lt.n_admitted} of {len(lt.admitted)} tokens"
        )
    return (
        f'<section class="card layer" style="--c:{layer_color(k)}" id="layer-{lt.index}">'
        f"<h3>Layer {lt.index} <span>· {about}</span></h3>"
        f'<div class="text">{spans}</div></section>'
    )


GDN_NOTE = """ GDN layers store nothing: they have no router, no τ and no KV cache. Their score is
the cosine surprise of the layer's own state, 1 − cos(v̂, v) with v̂ = α·S·k (the min over value
heads), the quantity a cosine HAM layer compares with τ; highlighted tokens there are those whose
surprise reached the level shown, where the state predicted the token's value worst."""


def render_html(t: Trace, png: bytes | None = None) -> str:
    """The report as one HTML document; `png` (the score plot) is embedded when given."""
    gdn = any(lt.kind == "gdn" for lt in t.layers)
    source = "trained" if t.threshold_source == "trained" else "set by --threshold"
    keys = "".join(
        f'<span class="key" style="--c:{layer_color(k)}"><span class="swatch"></span>'
        f"layer {lt.index}</span>"
        for k, lt in enumerate(t.layers)
    )
    dropped = (
        f" ({t.dropped} more tokens of the prompt were not inspected: --max-tokens)"
        if t.dropped
        else ""
    )
    plot = ""
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        plot = (
            '<h2>Surprise score along the text</h2><div class="card">'
            f'<img alt="surprise score per token and layer, with each threshold" '
            f'src="data:image/png;base64,{data}"></div>'
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HAM inspect · {escape(t.model_name)}</title><style>{CSS}</style></head>
<body><main>
<h1>What each HAM layer stored</h1>
<p class="meta">model <code>{escape(t.model_name)}</code> · {len(t.ids)} tokens{dropped} ·
thresholds {source}</p>
<div class="card legend">{keys}
<span class="note">Highlighted tokens were stored in that layer's KV cache: their surprise score
(how badly the layer's RNN predicted the token's value) was at least the layer's threshold τ.
The others live only in the RNN state. Hover a token for its score and τ.{GDN_NOTE if gdn else ""}
</span></div>
<h2>KV fraction per layer</h2>
<div class="card"><table>
<tr><th>layer</th><th>τ</th><th>stored</th><th>seen</th><th>KV fraction</th>
<th>score min / median / max</th></tr>
{"".join(summary_rows(t))}
</table></div>
<h2>Tokens by layer</h2>
{"".join(layer_block(t, k, lt) for k, lt in enumerate(t.layers))}
{plot}
<footer>ham-mlx inspect · stored = the token's position is held by the layer's HAM cache after
a chunked prefill, as in generation</footer>
</main></body></html>
"""

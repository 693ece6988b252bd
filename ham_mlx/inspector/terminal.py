"""Terminal view of a trace: the text once per layer, with the tokens a HAM layer stored (or
those a GDN layer's state predicted worst) marked."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TextIO

from ham_mlx.inspector.palette import ansi_background
from ham_mlx.inspector.trace import LayerTrace, Trace

RESET = "\x1b[0m"
INDENT = "  "


def use_color(stream: TextIO) -> bool:
    """ANSI colours only on a terminal and when NO_COLOR is unset or empty."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def marker(k: int, color: bool) -> tuple[Callable[[str], str], int]:
    """How layer k marks a stored token (its background colour, or [brackets]), and the
    visible width the mark adds."""
    if color:
        return (lambda s: f"\x1b[30;48;5;{ansi_background(k)}m{s}{RESET}"), 0
    return (lambda s: f"[{s}]"), 2


def shown(token: str) -> str:
    """A token for one table cell: newlines and tabs made visible."""
    return token.replace("\n", "↵").replace("\t", "⇥")


def words(tokens: list[str], stored: list[bool]) -> list[list[tuple[str, bool]]]:
    """Split the token stream into words of (text, stored) pieces; a newline is a word "\n"."""
    out: list[list[tuple[str, bool]]] = []
    for text, keep in zip(tokens, stored):
        for n, part in enumerate(text.split("\n")):
            if n:
                out += [[("\n", keep)], []]
            if part and (not out or not out[-1] or part[0] in " \t"):
                out.append([])
            if part:
                out[-1].append((part, keep))
    return [w for w in out if w]


def wrap(
    tokens: list[str], stored: list[bool], mark: Callable[[str], str], extra: int, width: int
) -> list[str]:
    """Lay the tokens out in lines of at most `width` visible characters, breaking between
    words (inside a word only when it is longer than a line) and at newlines. A stored token's
    leading spaces stay outside its mark, which adds `extra` visible characters."""
    lines: list[str] = []
    line, col = "", 0
    for word in words(tokens, stored):
        if word[0][0] == "\n":
            lines.append(line + (mark("↵") if word[0][1] else ""))
            line, col = "", 0
            continue
        size = sum(len(p) + (extra if keep else 0) for p, keep in word)
        for i, (part, keep) in enumerate(word):
            add = extra if keep else 0
            if col and col + (size if i == 0 else len(part) + add) > width:
                lines.append(line)
                line, col = "", 0
                part = part.lstrip(" ") or (part if keep else "")
            if not part:
                continue
            core = part.lstrip(" ") or part
            lead = part[: len(part) - len(core)]
            line += lead + (mark(core) if keep else core)
            col += len(part) + add
    if line or not lines:
        lines.append(line)
    return lines


GDN_NOTE = [
    "gdn layers: the score is the cosine surprise of the layer's own state, 1 - cos(v̂, v) with",
    "v̂ = α·S·k (min over value heads), the quantity a cosine HAM layer compares with τ. A GDN",
    "layer has no router, no τ and no KV cache: it stores nothing; the marks only show where",
    "its state predicted the token's value worst (surprise ≥ the level).",
]


def layer_header(t: Trace, lt: LayerTrace) -> str:
    if lt.kind == "gdn":
        return (
            f"layer {lt.index} (gdn, nothing stored)  surprise ≥ level {lt.threshold:.4f}: "
            f"{lt.n_admitted} of {len(lt.admitted)} ({lt.kv_fraction:.3f})"
        )
    return (
        f"layer {lt.index} ({t.layer_types[lt.index]})  τ {lt.threshold:.4f}  "
        f"stored {lt.n_admitted} of {len(lt.admitted)} (KV fraction {lt.kv_fraction:.3f})"
    )


def fraction_lines(t: Trace) -> list[str]:
    """The per-layer KV fraction, admitted / seen, of the HAM layers; the marked fraction of the
    GDN layers."""
    out = []
    for kind, title in (
        ("ham", "KV fraction (admitted / seen):"),
        ("gdn", "GDN surprise ≥ level (marked / seen; nothing is stored):"),
    ):
        rows = [
            f"{INDENT}layer {lt.index}  {lt.kv_fraction:.3f}  ({lt.n_admitted}/{len(lt.admitted)})"
            for lt in t.layers
            if lt.kind == kind
        ]
        out += [title, *rows] if rows else []
    return out


def score_table(t: Trace) -> list[str]:
    """Every token's score per layer; * marks a stored token (gdn: surprise ≥ level)."""
    head = f"{'pos':>5}  {'token':<14}" + "".join(
        f"{'layer ' + str(lt.index):>11}" for lt in t.layers
    )
    label = "τ / gdn level" if any(lt.kind == "gdn" for lt in t.layers) else "τ"
    taus = f"{'':>5}  {label:<14}" + "".join(f"{lt.threshold:>10.4f} " for lt in t.layers)
    rows = [head, taus]
    for p, tok in enumerate(t.tokens):
        cells = "".join(f"{lt.scores[p]:>10.4f}{'*' if lt.admitted[p] else ' '}" for lt in t.layers)
        rows.append(f"{p:>5}  {shown(tok)[:14]:<14}{cells}")
    return rows


def render(t: Trace, color: bool, width: int = 100, table: bool = False) -> str:
    """The whole terminal view: legend, one block per layer, the KV fraction lines."""
    kinds = {lt.kind for lt in t.layers}
    source = "trained" if t.threshold_source == "trained" else "set by --threshold"
    tau = f" · τ {source}" if "ham" in kinds else ""
    out = [f"ham-mlx inspect · model {t.model_name} · {len(t.ids)} tokens{tau}"]
    gdn = " (gdn: surprise ≥ level)" if "gdn" in kinds else ""
    if color:
        swatches = " ".join(
            marker(k, True)[0](f" layer {lt.index} ") for k, lt in enumerate(t.layers)
        )
        out.append(f"legend: stored tokens{gdn} are highlighted in their layer's colour: "
                   f"{swatches}")  # fmt: skip
    else:
        out.append(f"legend: [token] = stored in that layer's KV cache{gdn}")
    if "ham" in kinds:
        out.append("a token is stored when its surprise score ≥ the layer's τ; the others live")
        out.append("only in the RNN state")
    if "gdn" in kinds:
        out += GDN_NOTE
    if not table:
        out.append("(--table lists every score)")
    for k, lt in enumerate(t.layers):
        out += ["", layer_header(t, lt)]
        mark, extra = marker(k, color)
        lines = wrap(t.tokens, list(lt.admitted), mark, extra, width - len(INDENT))
        out += [INDENT + line for line in lines]
    out += ["", *fraction_lines(t)]
    if table:
        out += ["", *score_table(t)]
    return "\n".join(out)

"""Terminal view of a trace: the text once per HAM layer with the stored tokens marked."""

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


def layer_header(t: Trace, lt: LayerTrace) -> str:
    return (
        f"layer {lt.index} ({t.layer_types[lt.index]})  τ {lt.threshold:.4f}  "
        f"stored {lt.n_admitted} of {len(lt.admitted)} (KV fraction {lt.kv_fraction:.3f})"
    )


def fraction_lines(t: Trace) -> list[str]:
    """The per-layer KV fraction, admitted / seen."""
    rows = [f"{INDENT}layer {lt.index}  {lt.kv_fraction:.3f}  ({lt.n_admitted}/{len(lt.admitted)})"
            for lt in t.layers]  # fmt: skip
    return ["KV fraction (admitted / seen):", *rows]


def score_table(t: Trace) -> list[str]:
    """Every token's score per layer; * marks a stored token."""
    head = f"{'pos':>5}  {'token':<14}" + "".join(
        f"{'layer ' + str(lt.index):>11}" for lt in t.layers
    )
    taus = f"{'':>5}  {'τ':<14}" + "".join(f"{lt.threshold:>10.4f} " for lt in t.layers)
    rows = [head, taus]
    for p, tok in enumerate(t.tokens):
        cells = "".join(f"{lt.scores[p]:>10.4f}{'*' if lt.admitted[p] else ' '}" for lt in t.layers)
        rows.append(f"{p:>5}  {shown(tok)[:14]:<14}{cells}")
    return rows


def render(t: Trace, color: bool, width: int = 100, table: bool = False) -> str:
    """The whole terminal view: legend, one block per HAM layer, the KV fraction line."""
    source = "trained" if t.threshold_source == "trained" else "set by --threshold"
    out = [f"ham-mlx inspect · model {t.model_name} · {len(t.ids)} tokens · τ {source}"]
    if color:
        swatches = " ".join(
            marker(k, True)[0](f" layer {lt.index} ") for k, lt in enumerate(t.layers)
        )
        out.append(f"legend: stored tokens are highlighted in their layer's colour: {swatches}")
    else:
        out.append("legend: [token] = stored in that layer's KV cache")
    out.append("a token is stored when its surprise score ≥ the layer's τ; the others live")
    out.append("only in the RNN state" + ("" if table else " (--table lists every score)"))
    for k, lt in enumerate(t.layers):
        out += ["", layer_header(t, lt)]
        mark, extra = marker(k, color)
        lines = wrap(t.tokens, list(lt.admitted), mark, extra, width - len(INDENT))
        out += [INDENT + line for line in lines]
    out += ["", *fraction_lines(t)]
    if table:
        out += ["", *score_table(t)]
    return "\n".join(out)

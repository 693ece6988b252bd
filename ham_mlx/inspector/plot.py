"""The surprise score along the text, one panel per layer, τ as a line, stored tokens marked (GDN
layers: the cosine surprise of the state, the reference level, the tokens at or above it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ham_mlx.inspector.palette import layer_color
from ham_mlx.inspector.terminal import shown
from ham_mlx.inspector.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "the plot needs matplotlib: pip install matplotlib"
MAX_LABELLED = 90  # up to this many tokens, the x axis is labelled with the tokens themselves


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MISSING) from None


def plot_scores(t: Trace, path: str | Path | None = None) -> Figure:
    """One panel per inspected HAM or GDN layer; written to `path` (PNG) when given."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

    L = len(t.ids)
    x = np.arange(L)
    labelled = L <= MAX_LABELLED
    width = min(max(8.0, 0.16 * L), 16.0) if labelled else 14.0
    fig = Figure(figsize=(width, 1.9 * len(t.layers) + (1.2 if labelled else 0.6)), dpi=100)
    axes = fig.subplots(len(t.layers), 1, sharex=True, squeeze=False)[:, 0]
    top = max(1.05, max(float(lt.scores.max()) for lt in t.layers) * 1.08)
    dot, big, lw = (9, 30, 1.0) if labelled else (2, 12, 0.5)  # marker sizes, line width
    legends = set()
    for k, (ax, lt) in enumerate(zip(axes, t.layers)):
        color = layer_color(k)
        gdn = lt.kind == "gdn"
        below, above = ("below level", "≥ level (nothing stored)") if gdn else (
            "not stored", "stored in KV cache")  # fmt: skip
        ax.plot(x, lt.scores, color=color, lw=lw, alpha=0.55, zorder=1)
        ax.scatter(x[~lt.admitted], lt.scores[~lt.admitted], s=dot, color="#9a9a9a", zorder=2,
                   label=below)  # fmt: skip
        ax.scatter(x[lt.admitted], lt.scores[lt.admitted], s=big, color=color, edgecolors="black",
                   linewidths=0.5, zorder=3, label=above)  # fmt: skip
        ax.axhline(lt.threshold, color="#c0392b", ls="--", lw=1.1, zorder=0)
        ax.text(1.002, lt.threshold, f"{'level' if gdn else 'τ'} = {lt.threshold:.3f}",
                transform=ax.get_yaxis_transform(), color="#c0392b", va="center",
                fontsize=8)  # fmt: skip
        if lt.kind not in legends:  # one legend per kind of layer
            legends.add(lt.kind)
            ax.legend(loc="upper right", fontsize=7, ncol=2, framealpha=0.9)
        ax.set_ylim(0, top)
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylabel("surprise", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.25)
        title = (f"layer {lt.index}: stored {lt.n_admitted} of {L} tokens "
                 f"(KV fraction {lt.kv_fraction:.3f})")  # fmt: skip
        if gdn:
            title = (f"layer {lt.index} (gdn): cosine surprise of the state's prediction; "
                     f"{lt.n_admitted} of {L} tokens ≥ level, nothing stored")  # fmt: skip
        ax.set_title(title, loc="left", fontsize=9)
    if labelled:
        labels = [shown(tok).strip() or "␣" for tok in t.tokens]
        axes[-1].set_xticks(x, labels, rotation=90, fontsize=7)
    else:
        axes[-1].set_xlabel("token position", fontsize=8)
    fig.suptitle(f"Surprise score per token · {t.model_name}", fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig

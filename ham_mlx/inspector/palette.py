"""One colour per inspected layer, shared by the terminal view, the HTML report and the plot."""

from __future__ import annotations

# Okabe-Ito (colour-blind safe): orange, blue, green, pink, vermillion, sky, yellow.
LAYER_COLORS = ("#e69f00", "#0072b2", "#009e73", "#cc79a7", "#d55e00", "#56b4e9", "#d4c200")
ANSI_BACKGROUNDS = (214, 75, 78, 175, 209, 117, 227)  # xterm-256 tints of the same colours


def layer_color(k: int) -> str:
    """Hex colour of the k-th inspected layer."""
    return LAYER_COLORS[k % len(LAYER_COLORS)]


def ansi_background(k: int) -> int:
    """xterm-256 background of the k-th inspected layer."""
    return ANSI_BACKGROUNDS[k % len(ANSI_BACKGROUNDS)]

"""The haystack text: the held-out end of Shakespeare's plays and poems, shipped with ham_mlx
(ham_mlx/assets/shakespeare-heldout.txt; see ham_mlx/assets/TEXTS.md for the source)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HAYSTACK_FILE = ASSETS / "shakespeare-heldout.txt"
# RULER's passkey noise: the same sentences over and over.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@cache
def haystack_lines() -> tuple[str, ...]:
    """The shipped text's non-empty lines, stripped."""
    lines = (line.strip() for line in HAYSTACK_FILE.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line)

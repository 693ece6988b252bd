"""`ham-mlx serve` (work in progress)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register the `serve` subcommand on the CLI's subparsers."""

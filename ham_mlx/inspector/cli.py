"""`ham-mlx inspect` (work in progress)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register the `inspect` subcommand on the CLI's subparsers."""

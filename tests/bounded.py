"""Run a piece of Python in a child process under a time limit and an address-space limit, so
that a reader that hangs or allocates without bound fails its test instead of the machine."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run_bounded(code: str, timeout: float = 60, memory_bytes: int = 2 << 30):
    """`python -c code` (tests/ on sys.path) killed after `timeout` s, with RLIMIT_AS set to
    `memory_bytes` (on Linux). Returns the CompletedProcess; a timeout is an AssertionError."""

    def limit() -> None:
        if sys.platform.startswith("linux"):  # macOS does not enforce RLIMIT_AS
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    try:
        return subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r})\n{code}"],
            capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{code}") from None

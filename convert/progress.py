"""A progress line on stderr for reading large checkpoints (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

AUTO_BYTES = 256 * 1024**2  # show progress from this checkpoint size on


class Progress:
    """`update(nbytes)` as tensors are read. On a terminal one line is redrawn (at most 10 times
    a second); elsewhere a line is printed every 25%."""

    def __init__(self, total: int, label: str, enabled: bool | None = None,
                 stream: TextIO | None = None):  # fmt: skip
        self.total, self.label = max(total, 1), label
        self.stream = stream or sys.stderr
        self.enabled = total >= AUTO_BYTES if enabled is None else enabled
        self.tty = self.stream.isatty()
        self.done = 0
        self.last_draw = 0.0
        self.last_quarter = 0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or frac >= 1.0:
                self.last_draw = now
                self.stream.write(f"\r{self.line(frac)}")
                self.stream.flush()
        elif int(frac * 4) > self.last_quarter:
            self.last_quarter = int(frac * 4)
            print(self.line(frac), file=self.stream, flush=True)

    def line(self, frac: float) -> str:
        gb = 1024**3
        return f"{self.label} {frac:4.0%} ({self.done / gb:.2f} / {self.total / gb:.2f} GiB)"

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

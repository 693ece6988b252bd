"""Step timing for the training loop: tokens/s and the time left, from the median of recent
steps (the first step of a process compiles and is left out once others exist)."""

from __future__ import annotations

import statistics


class StepClock:
    def __init__(self, window: int = 20):
        self.first: float | None = None  # seconds of this process's first step (compiles)
        self.recent: list[float] = []
        self.window = window

    def add(self, seconds: float) -> None:
        if self.first is None:
            self.first = seconds
        else:
            self.recent = (self.recent + [seconds])[-self.window :]

    def per_step(self) -> float | None:
        if self.recent:
            return statistics.median(self.recent)
        return self.first

    def left(self, steps: int) -> float | None:
        """Estimated seconds for `steps` more steps (None before the first step)."""
        per = self.per_step()
        return None if per is None else per * steps


def duration(seconds: float) -> str:
    """'42 s', '12 min', '3 h 20 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"

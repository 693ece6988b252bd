"""Stop strings on streamed text."""

from __future__ import annotations


class StopText:
    """Finds the first stop string in text that arrives in pieces.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is, so what has been sent never contains (part of) a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string was found). When one was found the
        text is what came before it, and the generation should end."""
        held = self.held + text
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return held[: min(found)], True
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0
        )
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the generation."""
        held, self.held = self.held, ""
        return held

"""Stop strings on streamed text, found in time linear in the text (Knuth–Morris–Pratt)."""

from __future__ import annotations


def prefix_function(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopText:
    """Finds the first stop string in text that arrives in pieces.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is, so what has been sent never contains (part of) a stop string. Each stop string
    keeps how many of its first characters the text ends with, so each character is read once.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fails = [prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)  # the text ends with stops[i][: matched[i]]
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string was found). When one was found the
        text is what came before it, and the generation should end."""
        held = self.held + text
        first = None  # where the earliest stop string found begins, in held
        for i, (stop, fail) in enumerate(zip(self.stops, self.fails)):
            k = self.matched[i]
            for j in range(len(self.held), len(held)):
                c = held[j]
                while k and c != stop[k]:
                    k = fail[k - 1]
                if c == stop[k]:
                    k += 1
                if k == len(stop):
                    start = j + 1 - k
                    first = start if first is None else min(first, start)
                    break
            self.matched[i] = k
        if first is not None:
            self.held = ""
            self.matched = [0] * len(self.stops)
            return held[:first], True
        keep = max(self.matched, default=0)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the generation."""
        held, self.held = self.held, ""
        self.matched = [0] * len(self.stops)
        return held

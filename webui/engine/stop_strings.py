"""Stop strings, applied the same way on every loader: text is cut before the first stop string, and
while streaming, a tail that could still grow into a stop string is held back until it is decided."""
from __future__ import annotations


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopStringFilter:
    """Feed streamed deltas; get back the text that is safe to show. `stopped` turns True at the first
    stop string, after which the caller should end the generation."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        text, self.stopped = cut_at_stop(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return text
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        out, self.pending = text[:len(text) - hold], text[len(text) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

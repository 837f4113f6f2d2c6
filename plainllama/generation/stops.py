"""Stop strings: text that ends a generation, matched across token boundaries. Every loop (one
prompt streamed, a batch, beams) asks the same StopMatcher."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops=()):
        self.stops = [s for s in (stops or ()) if s]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str) -> int | None:
        """Where the earliest stop string starts in `text`, or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def cut(self, text: str) -> str:
        """`text` up to the first stop string (all of it if there is none)."""
        at = self.find(text)
        return text if at is None else text[:at]

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` could be the beginning of a stop string: a
        stream holds these back until the next tokens show whether they are."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

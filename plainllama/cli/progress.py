"""The progress line while layers stream from disk, so that a slow disk never looks like a hang:

    [streaming: layer 17/32 | 1.62 GB/s from disk | 0.11 tokens/s]

written over itself on the terminal (stderr) at most a few times a second, and erased at the end of
each forward pass so that it never mixes with the generated text on stdout."""

from __future__ import annotations

import time

UPDATES_PER_SECOND = 4


class StreamProgress:
    def __init__(self, stream):
        self.stream = stream
        self.last = 0.0
        self.width = 0

    def __call__(self, streamer, index: int) -> None:
        if index == streamer.order[-1]:  # the pass is over: clear the line before text is printed
            self.write("")
            return
        now = time.perf_counter()
        if now - self.last < 1 / UPDATES_PER_SECOND:
            return
        self.last = now
        stats = streamer.stats
        done, n = streamer.order.index(index) + 1, len(streamer.order)
        self.write(
            f"[streaming: layer {done}/{n} read | {stats.disk_speed / 1e9:.2f} GB/s from disk | "
            f"{stats.tokens_per_second:.2f} tokens/s]"
        )

    def write(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width) + ("\r" if not text else ""))
        self.stream.flush()
        self.width = len(text)

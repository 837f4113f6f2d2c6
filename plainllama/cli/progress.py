"""The progress line while layers stream from disk, so that a slow disk never looks like a hang:

    [streaming: layer 17/32 | 1.62 GB/s from disk | 0.11 tokens/s]

written over itself on the terminal (stderr) at most a few times a second, and erased at the end of
each forward pass. When stdout is the same terminal, the answer streams there, on the line the cursor
is on: the progress line is then drawn only while that line is empty (before the answer starts, and
after it ends with a newline), so it never overwrites the answer. `OutputTracker` stands in for
sys.stdout to know where the answer's line ends."""

from __future__ import annotations

import time

UPDATES_PER_SECOND = 4


class OutputTracker:
    """sys.stdout, noting whether the last text written ended its line."""

    def __init__(self, stream):
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, encoding, fileno, ...
        return getattr(self.stream, name)


class StreamProgress:
    def __init__(self, stream, output: OutputTracker | None = None):
        self.stream = stream
        self.output = output  # stdout, when it shows on the same terminal
        self.last = 0.0
        self.width = 0

    def __call__(self, streamer, index: int) -> None:
        if index == streamer.order[-1]:  # the pass is over: clear the line before text is printed
            self.write("")
            return
        now = time.perf_counter()
        if now - self.last < 1 / UPDATES_PER_SECOND:
            return
        if self.output is not None and not self.output.at_line_start:
            return  # the answer is on this line: drawing over it would erase it
        self.last = now
        stats = streamer.stats
        done, n = streamer.order.index(index) + 1, len(streamer.order)
        self.write(
            f"[streaming: layer {done}/{n} read | {stats.disk_speed / 1e9:.2f} GB/s from disk | "
            f"{stats.tokens_per_second:.2f} tokens/s]"
        )

    def write(self, text: str) -> None:
        if not text and not self.width:
            return  # nothing drawn, nothing to erase
        self.stream.write("\r" + text.ljust(self.width) + ("\r" if not text else ""))
        self.stream.flush()
        self.width = len(text)

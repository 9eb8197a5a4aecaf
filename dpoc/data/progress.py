"""A progress line on stderr: pairs done, rate, tokens/s and ETA (from the share of input consumed)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, unit: str, stream: TextIO = sys.stderr):
        self.total, self.unit, self.stream = total, unit, stream
        self.start = self.last = time.monotonic()
        self.interactive = stream.isatty()
        # a terminal gets an in-place line twice a second; a log file gets a line every 10 s
        self.interval = 0.5 if self.interactive else 10.0

    def update(self, position: int, pairs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        share = position / self.total if self.total else 1.0
        eta = elapsed * (1 - share) / share if share > 0 else 0.0
        when = f"done in {_clock(elapsed)}" if final else f"ETA {_clock(eta)}"
        line = (f"preprocess: {pairs:,} pairs  {share:6.1%} of input  {pairs / elapsed:,.0f} pairs/s  "
                f"{tokens / elapsed:,.0f} tok/s  {when}")
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

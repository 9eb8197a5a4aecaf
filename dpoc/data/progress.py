"""Progress lines on stderr: rewritten in place twice a second on a terminal, one line every 10 s in a log.

`Progress` counts preprocessing (pairs done, rate, tokens/s, ETA from the share of input consumed);
`TransferProgress` counts a weight conversion (tensors and bytes done, GB/s, ETA).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Line:
    def __init__(self, stream: TextIO | None):
        self.stream = stream if stream is not None else sys.stderr  # looked up now: it may have been replaced
        self.start = self.last = time.monotonic()
        self.interactive = self.stream.isatty()
        self.interval = 0.5 if self.interactive else 10.0

    def _due(self, final: bool) -> float | None:
        """Seconds since the start when a line is due now, else None."""
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return None
        self.last = now
        return max(now - self.start, 1e-9)

    def _when(self, elapsed: float, share: float, final: bool) -> str:
        eta = elapsed * (1 - share) / share if share > 0 else 0.0
        return f"done in {_clock(elapsed)}" if final else f"ETA {_clock(eta)}"

    def _emit(self, line: str, final: bool) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class Progress(_Line):
    def __init__(self, total: int, unit: str, stream: TextIO | None = None):
        super().__init__(stream)
        self.total, self.unit = total, unit

    def update(self, position: int, pairs: int, tokens: int, final: bool = False) -> None:
        elapsed = self._due(final)
        if elapsed is None:
            return
        share = position / self.total if self.total else 1.0
        self._emit(f"preprocess: {pairs:,} pairs  {share:6.1%} of input  {pairs / elapsed:,.0f} pairs/s  "
                   f"{tokens / elapsed:,.0f} tok/s  {self._when(elapsed, share, final)}", final)


class TransferProgress(_Line):
    def __init__(self, label: str, tensors: int, total_bytes: int, stream: TextIO | None = None):
        super().__init__(stream)
        self.label, self.tensors, self.total_bytes = label, tensors, total_bytes
        self.done = self.bytes = 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        self.update(final=False)

    def update(self, final: bool) -> None:
        elapsed = self._due(final)
        if elapsed is None:
            return
        share = self.bytes / self.total_bytes if self.total_bytes else 1.0
        self._emit(f"{self.label}: {self.done:,}/{self.tensors:,} tensors  {share:6.1%} of "
                   f"{self.total_bytes / 1e9:.2f} GB  {self.bytes / elapsed / 1e9:.2f} GB/s  "
                   f"{self._when(elapsed, share, final)}", final)

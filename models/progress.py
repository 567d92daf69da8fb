"""A dependency-free progress line for long CLI runs: step, loss, rate and ETA on stderr.

On a terminal the line is redrawn in place; otherwise (logs, CI) a full line is written every 5 %.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``."""
    s = int(max(seconds, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


class ProgressLine:
    """Progress of a loop of ``total`` steps."""

    def __init__(self, total: int, enabled: bool = True, start: int = 0, stream: TextIO | None = None) -> None:
        """Start the clock; ``start`` is the first step (for resumed runs)."""
        self.total = total
        self.enabled = enabled
        self.start = start
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_pct = -1
        self._last_draw = 0.0

    def update(self, step: int, loss: float) -> None:
        """Report that ``step`` of ``total`` is done with this ``loss``."""
        if not self.enabled:
            return
        now = time.monotonic()
        pct = int(100 * step / self.total)
        if self.tty:
            if now - self._last_draw < 0.2 and step < self.total:
                return
        elif pct // 5 == self._last_pct // 5 and step < self.total:
            return
        self._last_pct, self._last_draw = pct, now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        line = f"train {step}/{self.total} {pct:3d}% loss {loss:.4f} {rate:.2f} it/s ETA {format_duration(eta)}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
